"""DINOv2 linear-probe grid on cached frozen features (``dinov2/eval/linear.py``).

All heads of the grid n_last_blocks x avgpool x lr are trained together in one loop on the same
batches (loss = sum of the heads' cross-entropies, as DINOv2 does), so the grid costs one pass
over the features rather than 52. The best head is selected on the val set and its top-1 is the
reported number, which is DINOv2's (optimistic, but the paper's) protocol.

The batch is DINOv2's global one (``evaluate.classic.linear.batch_size``, 1024: 128 per GPU on
its standard 8 GPUs); one process computes the same mean loss as the 8 ranks' averaged
gradients, so ``world_size`` stays 1 and the lrs scale by 1024 / 256.

Deviation, on purpose: features are computed once and cached (``features.linear_features``:
in memory, or on disk for ImageNet at paper scale) from the eval transform (resize + centre
crop), so there is no per-iteration RandomResizedCrop/flip augmentation; re-running the encoder
for 12.5k iterations of 1024 would cost ten passes over ImageNet. Heads read their inputs per
batch, so a split's concatenated inputs never exist at once. Everything else follows DINOv2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# DINOv2's learning-rate grid; each value is multiplied by batch_size * world_size / 256.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)

__all__ = ["DINOV2_LRS", "ProbeSetting", "LinearProbeResult", "linear_input", "linear_probe"]


@dataclass(frozen=True)
class ProbeSetting:
    """One head of the grid; ``lr`` is the base lr before batch scaling."""

    n_last_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        """DINOv2's classifier naming, e.g. ``classifier_4_blocks_avgpool_True_lr_0_00100``."""
        return (f"classifier_{self.n_last_blocks}_blocks_avgpool_{self.avgpool}_lr_"
                f"{self.lr:.5f}".replace(".", "_"))


@dataclass
class LinearProbeResult:
    """Best head's val top-1 (percent), its setting, and every head's top-1 by name."""

    top1: float
    setting: ProbeSetting
    all_results: dict[str, float] = field(default_factory=dict)


def linear_input(cls_tokens: torch.Tensor, avgpool: torch.Tensor, n_last_blocks: int,
                 use_avgpool: bool) -> torch.Tensor:
    """DINOv2 ``create_linear_input``: concat CLS of the last n blocks (+ last block's avgpool).

    ``cls_tokens`` is (L, N, D) in block order (last block last); ``avgpool`` is the last block's
    mean patch token (N, D) or (L, N, D), in which case its last layer is used.
    """
    if cls_tokens.ndim != 3:
        raise ValueError(f"cls_tokens must be (layers, N, D); got {tuple(cls_tokens.shape)}")
    if n_last_blocks > cls_tokens.shape[0]:
        raise ValueError(f"n_last_blocks={n_last_blocks} but only {cls_tokens.shape[0]} "
                         "blocks cached")
    parts = list(cls_tokens[-n_last_blocks:])
    if use_avgpool:
        parts.append(avgpool[-1] if avgpool.ndim == 3 else avgpool)
    return torch.cat(parts, dim=-1).float()


def _check(feats: Mapping) -> None:
    for key in ("cls", "avgpool", "labels"):
        if feats.get(key) is None:
            raise ValueError(f"features need a '{key}' entry (see features.extract_features)")


def _rows(feats: Mapping, idx: torch.Tensor, configs: Sequence[tuple[int, bool]],
          device: str | torch.device) -> dict[tuple[int, bool], torch.Tensor]:
    """Each head family's inputs for the samples ``idx`` only: the concatenated inputs of a
    whole split would be (N, 5*D) per family, 100 GB for ImageNet at ViT-7B width."""
    avg = feats["avgpool"]
    cls, avg = feats["cls"][:, idx], (avg[:, idx] if avg.ndim == 3 else avg[idx])
    return {c: linear_input(cls, avg, *c).to(device) for c in configs}


class _HeadBank(nn.Module):
    """``n_heads`` linear classifiers on the same input, one per lr, evaluated as one einsum.

    Separate ``nn.Linear`` heads with per-head param groups (DINOv2's layout) cost one kernel
    launch per head; stacking them is the same maths. The update is torch's SGD with momentum
    (buffer = grad on the first step, then m * buf + grad; p -= lr * buf) with a per-head lr.
    """

    def __init__(self, in_dim: int, num_classes: int, n_heads: int, g: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_heads, num_classes, in_dim, generator=g) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_heads, num_classes))
        self._bufs: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,hcd->hbc", x, self.weight) + self.bias[:, None, :]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        h, b, c = logits.shape
        return F.cross_entropy(logits.reshape(h * b, c), y.repeat(h), reduction="sum") / b

    @torch.no_grad()
    def sgd_step(self, lr: torch.Tensor, momentum: float) -> None:
        params = (self.weight, self.bias)
        if self._bufs is None:
            self._bufs = [p.grad.clone() for p in params]
        else:
            for buf, p in zip(self._bufs, params):
                buf.mul_(momentum).add_(p.grad)
        self.weight.sub_(lr * self._bufs[0])
        self.bias.sub_(lr[:, :, 0] * self._bufs[1])

    def saved(self) -> dict[str, Any]:
        """Weights and momentum buffers, what a resumed training needs of this bank."""
        return {"weight": self.weight.detach().cpu().clone(), "bias": self.bias.detach().cpu().clone(),
                "bufs": None if self._bufs is None else [b.cpu().clone() for b in self._bufs]}

    @torch.no_grad()
    def load(self, saved: Mapping[str, Any]) -> None:
        self.weight.copy_(saved["weight"])
        self.bias.copy_(saved["bias"])
        self._bufs = None if saved["bufs"] is None else [b.to(self.weight.device) for b in saved["bufs"]]

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions per head on one batch."""
        return (self(x).argmax(-1) == y).sum(1)


def linear_probe(train: Mapping, val: Mapping, num_classes: int, *,
                 n_last_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True),
                 lrs: Sequence[float] = DINOV2_LRS, batch_size: int = 128, world_size: int = 1,
                 epochs: int = 10, epoch_length: int = 1250, seed: int = 0,
                 device: str | torch.device = "cpu", state: Optional[Mapping[str, Any]] = None,
                 checkpoint: Optional[Callable[[int, Callable[[], dict[str, Any]]], None]] = None
                 ) -> LinearProbeResult:
    """Train the whole grid jointly; return the best head on ``val``.

    ``train``/``val`` are dicts with ``cls`` (L, N, D), ``avgpool`` and ``labels`` as written by
    ``extract_features``. Per DINOv2: weight ~ N(0, 0.01), bias 0; SGD momentum 0.9, wd 0;
    cosine annealing to 0 over ``epochs * epoch_length`` iterations; batches come from a
    stream reshuffled at every pass (DINOv2's infinite sampler); lr scaled by batch*world/256.
    ``checkpoint(done, make_state)`` follows each iteration (``progress.EvalProgress.torch_saver``);
    a ``state`` it saved resumes the training where it stopped, to the same heads.
    """
    configs = [(n, a) for n in n_last_blocks for a in avgpool]
    _check(train)
    _check(val)
    y_tr, y_va = train["labels"].long(), val["labels"].long()
    dim = train["cls"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    base_lr = torch.tensor([lr * batch_size * world_size / 256.0 for lr in lrs],
                           device=device).view(-1, 1, 1)
    heads = {c: _HeadBank(dim * (c[0] + c[1]), num_classes, len(lrs), g).to(device) for c in configs}
    total = epochs * epoch_length
    n_train = len(y_tr)
    perm, pos = torch.randperm(n_train, generator=g), 0
    first = 0
    if state is not None:
        first, perm, pos = int(state["iteration"]), state["perm"], int(state["pos"])
        g.set_state(state["generator"])
        for bank, saved in zip(heads.values(), state["heads"], strict=True):
            bank.load(saved)

    def make_state() -> dict[str, Any]:
        return {"iteration": it + 1, "perm": perm, "pos": pos, "generator": g.get_state(),
                "heads": [bank.saved() for bank in heads.values()]}

    for it in range(first, total):
        if pos + batch_size > n_train:
            perm, pos = torch.randperm(n_train, generator=g), 0
        idx = perm[pos:pos + min(batch_size, n_train)]
        pos += batch_size
        xs, y = _rows(train, idx, configs, device), y_tr[idx].to(device)
        # Sum over heads of each head's mean CE, as DINOv2's summed classifier losses.
        loss = sum(bank.loss(xs[c], y) for c, bank in heads.items())
        for bank in heads.values():
            bank.zero_grad(set_to_none=True)
        loss.backward()
        cos = 0.5 * (1.0 + math.cos(math.pi * it / total))  # CosineAnnealingLR, eta_min 0
        for bank in heads.values():
            bank.sgd_step(base_lr * cos, momentum=0.9)
        if checkpoint is not None:
            checkpoint(it + 1, make_state)
    correct = {c: torch.zeros(len(lrs), dtype=torch.long, device=device) for c in configs}
    for start in range(0, len(y_va), 4096):
        idx = torch.arange(start, min(start + 4096, len(y_va)))
        xs, y = _rows(val, idx, configs, device), y_va[idx].to(device)
        for c, bank in heads.items():
            correct[c] += bank.correct(xs[c], y)
    settings, results = [], {}
    for c in configs:
        acc = (100.0 * correct[c].double().cpu() / len(y_va)).tolist()
        for lr, a in zip(lrs, acc):
            s = ProbeSetting(c[0], c[1], lr)
            settings.append(s)
            results[s.name] = a
    best = max(range(len(settings)), key=lambda i: (results[settings[i].name], -i))
    return LinearProbeResult(results[settings[best].name], settings[best], results)
