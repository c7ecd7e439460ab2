"""Platonic-representation mutual-kNN alignment between a vision encoder and a language model.

Follows ``minyoungg/platonic-rep`` (Huh et al., 2024), which the paper's Fig. 9 cites: each model's
per-layer features are clamped at ONE threshold per model (the q-quantile of |x| over all layers,
samples and dims: the reference's ``exact=True`` path used by ``platonic.Alignment.score``),
L2-normalised per layer, and the score is the max of mutual-kNN@k over every
(layer of A, layer of B) pair.

Layout: features are layer-first, ``(L, N, D)`` or a list of ``(N, D_l)``; the reference stores
``(N, L, D)`` and splits on dim 1, which is the same set of layers. Inputs as in the reference:
vision = CLS of every block before the final norm,
``features.extract_features(encoder, batches, indices=None, norm=False)["cls"]``; language =
masked token-mean of every hidden state, ``language.lm_layer_features``.

Speed: the reference recomputes both kNN sets for each of the ``La x Lb`` pairs. Here each
layer's kNN index set is computed once (``La + Lb`` top-k searches) and all pair intersections
come from one gather into B's neighbour masks, which gives the same numbers
(``benchmarks/bench_alignment.py`` checks equality against a per-pair loop).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = [
    "mutual_knn",
    "alignment_score",
    "alignment_matrix",
    "alignment_se",
    "clamp_layers",
    "clamp_threshold",
    "knn_indices",
    "pair_hits",
]


def _as_layer_list(layers: Layers, name: str) -> list[torch.Tensor]:
    """Validate ``(L, N, D)`` / list-of-``(N, D)`` input; errors name the argument."""
    if isinstance(layers, torch.Tensor):
        if layers.ndim != 3:
            raise ValueError(f"{name} must be (layers, N, D) or a list of (N, D); got shape "
                             f"{tuple(layers.shape)}")
        out = list(layers.unbind(0))
    elif isinstance(layers, (list, tuple)):
        out = list(layers)
        for li, t in enumerate(out):
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}[{li}] must be a 2-D (N, D) tensor; got {shape}")
    else:
        raise TypeError(f"{name} must be a tensor or a list of tensors; "
                        f"got {type(layers).__name__}")
    if not out:
        raise ValueError(f"{name} has no layers")
    n = out[0].shape[0]
    if any(t.shape[0] != n for t in out):
        raise ValueError(f"{name}: all layers must have the same number of samples N")
    if any(t.shape[1] == 0 for t in out):
        raise ValueError(f"{name}: feature dimension D must be > 0")
    for li, t in enumerate(out):  # a NaN row gets arbitrary neighbours: a wrong score, silently
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        if bad:
            raise ValueError(f"{name}[{li}]: {bad} of {n} samples have non-finite (NaN/inf) features")
    return out


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or k < 1 or k >= n:
        raise ValueError(f"k must be an int in [1, N-1] = [1, {n - 1}]; got {k!r}")


def clamp_threshold(layers: Layers, q: float = 0.95, exact: bool = True) -> float:
    """The reference's outlier threshold (``metrics.remove_outliers``), one value per model.

    ``exact`` (``platonic.Alignment.score``; ``measure_alignment.py --precise``): the element
    ``sort(|x|.flatten())[int(q * numel)]`` over all layers, samples and dims, found with
    ``kthvalue`` (no interpolation, as the reference). Otherwise (``measure_alignment.py``'s
    default): each sample's interpolated q-quantile of |x| over its layers and dims, averaged
    over the samples.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1]; got {q}")
    parts = _as_layer_list(layers, "layers")
    if not exact:
        per_sample = torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1).abs().float()
        return float(torch.quantile(per_sample, q, dim=1).mean())
    flat = torch.cat([t.reshape(-1) for t in parts]).abs().float()
    idx = min(int(q * flat.numel()), flat.numel() - 1)
    return float(flat.kthvalue(idx + 1).values)


def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k nearest rows by inner product, self excluded.

    The diagonal is set to -inf (the reference uses -1e8, equivalent for unit-norm rows).
    ``topk`` replaces the reference's full ``argsort``; both give the same sets barring exact
    ties in similarity, which do not occur for distinct real-valued features.
    """
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over samples of ``|kNN_A(i) & kNN_B(i)| / k`` with cosine kNN, self excluded.

    ``a`` (N, Da) and ``b`` (N, Db) need not be normalised: rows are L2-normalised here (a no-op
    for already-normalised input), so neighbours are by cosine similarity. No clamping here;
    ``alignment_score`` does the reference's clamp first.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D (N, D) tensor; got {shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same N; got {a.shape[0]} and {b.shape[0]}")
    _check_k(k, a.shape[0])
    return float(alignment_matrix([a], [b], k=k, q=1.0)[0, 0])


def _layer_knn(layers: list[torch.Tensor], k: int) -> torch.Tensor:
    """(L, N, k) neighbour indices of every layer: one top-k search per layer."""
    return torch.stack([knn_indices(F.normalize(t.float(), dim=-1), k) for t in layers])


def clamp_layers(layers: Layers, q: float = 0.95, exact: bool = True,
                 pick: Sequence[int] | None = None) -> list[torch.Tensor]:
    """A model's layers ``pick`` (default: all) in fp32, clamped at its one threshold over all its
    layers (``clamp_threshold``; ``q=1``: as given, in their own dtype). Clamped once, they are
    passed on with ``q=1``: the threshold of a 70B LM is a k-th value over ~0.7 G elements, and
    both the score and its standard error need it."""
    parts = _as_layer_list(layers, "layers")
    chosen = parts if pick is None else [parts[i] for i in pick]
    if q >= 1.0:
        return chosen
    threshold = clamp_threshold(parts, q, exact)
    return [t.float().clamp(-threshold, threshold) for t in chosen]


def alignment_matrix(layers_a: Layers, layers_b: Layers, k: int = 10,
                     q: float = 0.95, chunk: int = 8, exact: bool = True) -> torch.Tensor:
    """(La, Lb) float64 tensor of mutual-kNN@k for every layer pair after clamp + L2-norm.

    Intersections: B's neighbour sets become bool masks ``(Lb, N, N)``; for every layer i of A
    the masks are gathered at A's k neighbour indices, giving ``(Lb, N, k)`` hits whose sum is
    the intersection size. ``chunk`` A-layers are gathered at once to bound memory
    (``chunk * Lb * N * k`` bools). ``q=1`` disables clamping, as in the reference; ``exact``
    chooses the threshold (``clamp_threshold``).
    """
    la = _as_layer_list(layers_a, "layers_a")
    lb = _as_layer_list(layers_b, "layers_b")
    n = la[0].shape[0]
    if lb[0].shape[0] != n:
        raise ValueError(f"layers_a and layers_b must have the same N; "
                         f"got {n} and {lb[0].shape[0]}")
    _check_k(k, n)
    la, lb = clamp_layers(la, q, exact), clamp_layers(lb, q, exact)
    knn_a = _layer_knn(la, k)                                  # (La, N, k)
    knn_b = _layer_knn(lb, k)                                  # (Lb, N, k)
    mask_b = torch.zeros(len(lb), n, n, dtype=torch.bool, device=knn_b.device)
    mask_b.scatter_(2, knn_b, True)                            # (Lb, N, N)
    dev = knn_b.device
    rows = torch.arange(n, device=dev).view(1, 1, n, 1)
    lb_idx = torch.arange(len(lb), device=dev).view(1, -1, 1, 1)
    counts = torch.empty(len(la), len(lb), dtype=torch.int64)
    for s in range(0, len(la), chunk):
        idx = knn_a[s:s + chunk].unsqueeze(1)                  # (c, 1, N, k)
        hits = mask_b[lb_idx, rows, idx]                       # (c, Lb, N, k)
        counts[s:s + chunk] = hits.sum(dim=(-1, -2)).cpu()     # total intersections per pair
    # Exact integer totals / (N k) = mean over samples of |intersection| / k.
    return counts.double() / (n * k)


def alignment_score(layers_a: Layers, layers_b: Layers, k: int = 10,
                    q: float = 0.95, exact: bool = True) -> tuple[float, tuple[int, int]]:
    """Max mutual-kNN@k over all layer pairs and its (i, j): the paper's Fig. 9 number.

    Ties resolve to the first pair in row-major (i, j) order, as the reference's strict ``>``
    scan does.
    """
    mat = alignment_matrix(layers_a, layers_b, k=k, q=q, exact=exact)
    flat = int(torch.argmax(mat))
    i, j = divmod(flat, mat.shape[1])
    return float(mat[i, j]), (i, j)


def pair_hits(layers_a: Layers, layers_b: Layers, pair: tuple[int, int], k: int = 10,
              q: float = 0.95, exact: bool = True) -> torch.Tensor:
    """(N,) per-sample ``|kNN_A(n) & kNN_B(n)|`` at one layer pair (``alignment_score``'s), the
    features clamped as ``alignment_matrix`` clamps them: their mean / k is that pair's score,
    their spread over samples its standard error (``alignment_se``)."""
    la, lb = _as_layer_list(layers_a, "layers_a"), _as_layer_list(layers_b, "layers_b")
    (a,), (b,) = clamp_layers(la, q, exact, [pair[0]]), clamp_layers(lb, q, exact, [pair[1]])
    _check_k(k, a.shape[0])
    knn_a, knn_b = (knn_indices(F.normalize(t.float(), dim=-1), k) for t in (a, b))
    mask_b = torch.zeros(b.shape[0], b.shape[0], dtype=torch.bool, device=knn_b.device)
    mask_b.scatter_(1, knn_b, True)
    return mask_b.gather(1, knn_a).sum(dim=1)


def alignment_se(hits: torch.Tensor, k: int) -> float:
    """Standard error over samples of a mutual-kNN score from its ``pair_hits``. The paper
    prints one score per model; at the mini scale's 1,024 captions it is ~11 % of the score (0.0028 to
    0.0030 on scores near 0.026, make reproduce at 82053f8),
    more than the differences between model sizes, which a claim must therefore clear."""
    scores = hits.double() / k
    return float(scores.std(unbiased=True) / scores.numel() ** 0.5)
