"""Platonic mutual-kNN alignment: hand cases, chance level, reference equivalence, shape errors."""

import collections
import math
import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from webssl_repro.evaluate.alignment import (alignment_matrix, alignment_score, clamp_threshold,
                                             mutual_knn)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def _ref_mutual_knn(a, b, k):
    """platonic-rep's AlignmentMetrics.mutual_knn on normalised rows (argsort, -1e8 diagonal)."""
    def knn(x):
        return (x @ x.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]
    ka, kb = knn(F.normalize(a, dim=-1)), knn(F.normalize(b, dim=-1))
    n = a.shape[0]
    r = torch.arange(n).unsqueeze(1)
    ma, mb = torch.zeros(n, n), torch.zeros(n, n)
    ma[r, ka], mb[r, kb] = 1.0, 1.0
    return ((ma * mb).sum(1) / k).mean().item()


def test_mutual_knn_hand_case():
    # A: NN pairs 0<->1, 2<->3. B at 0, 10, 90, 200 deg: 0->1, 1->0, 2->1, 3->2.
    a = _unit([0, 10, 90, 100])
    b = _unit([0, 10, 90, 200])
    assert mutual_knn(a, b, k=1) == pytest.approx(0.75)
    # Scaling rows does not change cosine neighbours: inputs need not be normalised.
    assert mutual_knn(a * torch.tensor([[1.0], [5.0], [0.1], [3.0]], dtype=a.dtype), b, 1) == \
        pytest.approx(0.75)


def test_identical_features_score_one():
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    assert mutual_knn(x, x, k=10) == 1.0
    # [-x, x] has the same |x| quantile as x, hence the same clamp, and -x the same cosine
    # neighbours: both pairs score 1 and the first in row-major order is reported.
    score, ij = alignment_score(torch.stack([-x, x]), [x], k=10)
    assert score == 1.0 and ij == (0, 0)
    assert alignment_matrix(torch.stack([-x, x]), [x], k=10).flatten().tolist() == [1.0, 1.0]


def test_independent_features_at_chance():
    # Each of B's k neighbours lands in A's k-set with p = k/(N-1); the per-sample overlap is
    # ~Binomial(k, p), so the mean over N has std sqrt(k p (1-p) / N) / k ~= 0.0019 for
    # N=512, k=10. Tolerance 0.006 ~= 3 sigma around chance 10/511 = 0.0196.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 64, generator=g), torch.randn(512, 48, generator=g)
    assert mutual_knn(a, b, k=10) == pytest.approx(10 / 511, abs=0.006)


def test_argmax_pair_is_found():
    g = torch.Generator().manual_seed(2)
    la = torch.randn(4, 256, 32, generator=g)
    lb = [torch.randn(256, 24, generator=g) for _ in range(3)]
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    lb[2] = la[1] @ rot  # same geometry, different basis
    score, ij = alignment_score(la, lb, k=10, q=1.0)
    assert ij == (1, 2) and score == pytest.approx(1.0)
    lb[2] = la[1].clone()  # with the default clamp the copy still wins by far
    score, ij = alignment_score(la, lb, k=10)
    assert ij == (1, 2) and score > 0.8
    mat = alignment_matrix(la, lb, k=10)
    others = torch.cat([mat[:1].flatten(), mat[2:].flatten(), mat[1, :2]])
    assert others.max() < 0.1


def test_matrix_equals_reference_per_pair_loop():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(160, 8, generator=g)
    la = torch.stack([z @ torch.randn(8, 20, generator=g) * i + torch.randn(160, 20, generator=g)
                      for i in range(3)])
    lb = torch.stack([z @ torch.randn(8, 12, generator=g) * j + torch.randn(160, 12, generator=g)
                      for j in range(4)])
    mat = alignment_matrix(la, lb, k=7, q=1.0)
    ref = torch.tensor([[_ref_mutual_knn(a, b, 7) for b in lb] for a in la], dtype=torch.float64)
    assert torch.allclose(mat, ref, atol=1e-6)
    assert mat.max() > 0.1  # the shared latent makes some pairs clearly above chance


def test_clamp_threshold_hand_case_and_single_threshold_per_model():
    x = torch.arange(20, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(10)
    layers = [x[:10].view(2, 5), x[10:].view(2, 5)]
    # Reference: sort(|x|)[int(q * numel)] over both layers -> index 10 -> value 10.
    assert clamp_threshold(layers, 0.5) == 10.0
    assert clamp_threshold(layers, 0.95) == 19.0
    assert clamp_threshold(layers, 0.25) == 5.0
    # alignment_score clamps all layers of a model at that one threshold before normalising.
    g = torch.Generator().manual_seed(4)
    la = torch.randn(3, 100, 16, generator=g) ** 3
    lb = torch.randn(2, 100, 16, generator=g) ** 3
    ta, tb = clamp_threshold(la, 0.9), clamp_threshold(lb, 0.9)
    manual = alignment_matrix(la.clamp(-ta, ta), lb.clamp(-tb, tb), k=5, q=1.0)
    assert torch.equal(alignment_matrix(la, lb, k=5, q=0.9), manual)
    assert not torch.equal(alignment_matrix(la, lb, k=5, q=1.0), manual)


@pytest.mark.parametrize("exact", [True, False])
def test_layers_clamped_once_score_as_clamped_inside(exact):
    """``run_alignment`` clamps each model once (``clamp_layers``) and scores at q=1: the same
    matrix and per-caption hits as clamping inside, at the model's one threshold, not a layer's."""
    from webssl_repro.evaluate.alignment import clamp_layers, pair_hits

    g = torch.Generator().manual_seed(4)
    la = torch.randn(3, 100, 16, generator=g) ** 3 * torch.tensor([1.0, 4.0, 0.25]).view(3, 1, 1)
    lb = torch.randn(2, 100, 16, generator=g) ** 3
    ca, cb = clamp_layers(la, 0.9, exact), clamp_layers(lb, 0.9, exact)
    inside = alignment_matrix(la, lb, k=5, q=0.9, exact=exact)
    assert torch.equal(alignment_matrix(ca, cb, k=5, q=1.0), inside)
    per_layer = [t.clamp(-clamp_threshold([t], 0.9, exact), clamp_threshold([t], 0.9, exact)) for t in la]
    assert not torch.equal(alignment_matrix(per_layer, cb, k=5, q=1.0), inside)
    for pair in [(0, 1), (2, 0)]:
        assert torch.equal(pair_hits(ca, cb, pair, k=5, q=1.0), pair_hits(la, lb, pair, k=5, q=0.9, exact=exact))
    assert [tuple(t.shape) for t in clamp_layers(la, 0.9, exact, [2])] == [(100, 16)]


def test_large_input_takes_the_exact_element():
    """Past torch.quantile's 16M-element limit (an 8B LM on 1024 captions: 138M values in one
    sort) the threshold is still sort(|x|)[int(0.95 * 17M)]: in a shuffled 0, 1, ..., 17M - 1
    that is 16,150,000 (exact in float32, below 2**24); an index off by one gives its neighbour."""
    x = torch.randperm(17_000_000, generator=torch.Generator().manual_seed(0)).float()
    assert clamp_threshold([x.view(-1, 1000)], 0.95) == 16_150_000.0


def test_per_sample_clamp_of_measure_alignment():
    """``exact=False`` (measure_alignment.py's default): each sample's interpolated quantile of
    |x| over its layers and dims, averaged. Hand case: two samples over two 2-d layers."""
    layers = [torch.tensor([[1.0, -2.0], [10.0, 20.0]]), torch.tensor([[3.0, 4.0], [30.0, -40.0]])]
    # sample 0: |x| = 1, 2, 3, 4 -> median 2.5; sample 1: 10, 20, 30, 40 -> 25; mean 13.75
    assert clamp_threshold(layers, 0.5, exact=False) == pytest.approx(13.75)
    assert clamp_threshold(layers, 0.5) == 10.0  # exact: element int(0.5 x 8) = 4 of 1, 2, 3, 4, 10, ...
    g = torch.Generator().manual_seed(4)
    la, lb = torch.randn(3, 100, 16, generator=g) ** 3, torch.randn(2, 100, 16, generator=g) ** 3
    ta, tb = clamp_threshold(la, 0.9, exact=False), clamp_threshold(lb, 0.9, exact=False)
    manual = alignment_matrix(la.clamp(-ta, ta), lb.clamp(-tb, tb), k=5, q=1.0)
    assert torch.equal(alignment_matrix(la, lb, k=5, q=0.9, exact=False), manual)


def test_bad_shapes_name_the_argument():
    good = torch.randn(2, 50, 8)
    with pytest.raises(ValueError, match="layers_a"):
        alignment_score(torch.randn(50, 8), good)
    with pytest.raises(ValueError, match=r"layers_b\[1\]"):
        alignment_score(good, [torch.randn(50, 8), torch.randn(1, 50, 8)])
    with pytest.raises(ValueError, match="same N"):
        alignment_score(good, torch.randn(2, 49, 8))
    with pytest.raises(ValueError, match="layers_b has no layers"):
        alignment_score(good, [])
    with pytest.raises(ValueError, match="k must"):
        alignment_score(good, good, k=50)
    with pytest.raises(ValueError, match="a must be a 2-D"):
        mutual_knn(torch.randn(3, 50, 8), torch.randn(50, 8), k=3)
    spoilt = good.clone()
    spoilt[1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layers_b\[1\]: 1 of 50 samples have non-finite"):
        alignment_score(good, spoilt)



def test_feature_caches_are_written_whole(tmp_path, monkeypatch):
    """A file that other jobs read (the alignment LM features) appears only complete: a save
    that dies midway leaves no file at its path."""
    import torch

    from webssl_repro.evaluate.features import save_atomic

    path = tmp_path / "c" / "lm.pt"
    save_atomic({"x": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))

    def dies(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        save_atomic({"x": torch.arange(5)}, tmp_path / "d" / "lm.pt")
    assert not (tmp_path / "d" / "lm.pt").exists() and list((tmp_path / "d").iterdir()) == []
    assert torch.load(path)["x"].tolist() == [0, 1, 2]


@pytest.fixture
def captions_set(tmp_path):
    """A generated captions eval set of 256 image-caption pairs."""
    from helpers_mini import TINY_EVALSETS

    from webssl_repro.data.stages import build_evalset

    path = tmp_path / "evalsets" / "captions.json"
    build_evalset("captions", TINY_EVALSETS, str(path))
    return path


def test_language_features_are_computed_once_and_read_by_each_alignment(captions_set, tmp_path, monkeypatch):
    """The language-features job saves MiniLM's 7 layers (embeddings and 6 blocks) of the 256
    captions; an alignment given that file scores exactly as one that computes them itself, and
    does not compute them."""
    from webssl_repro.cli import main
    from webssl_repro.evaluate import alignment_eval
    from webssl_repro.evaluate.imagesets import load_split

    out = tmp_path / "language_features" / "minilm.pt"
    assert main(["language-features", "--language-model", "minilm", "--eval-json", '{"scale":"mini"}',
                 "--data", str(captions_set), "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    captions = [r["caption"] for r in load_split(captions_set, "test")]
    assert saved["language_model"] == "minilm" and saved["captions"] == 256 == len(set(captions))
    assert saved["features"].shape == (7, 256, 384) and (saved["layers"], saved["dim"]) == (7, 384)
    vis = torch.randn(4, 256, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(alignment_eval, "vision_layers", lambda *a: vis)
    cfg = {"language_models": ["minilm"], "k": 10}
    here = alignment_eval.run_alignment(None, {}, captions_set, cfg)

    def computed(*args):
        raise AssertionError("computed the LM features again")

    monkeypatch.setattr(alignment_eval, "language_layers", computed)
    assert alignment_eval.run_alignment(None, {}, captions_set, cfg, [out]) == here
    assert 0.0 < here["alignment/minilm"] < 1.0


def test_a_pinned_language_model_is_read_at_its_revision(captions_set, tmp_path, monkeypatch):
    """evaluate.alignment.lm_revisions pins a hub LM's commit for its tokenizer and weights,
    named by its short name or (through lm_paths) by its hub id, and the features file records
    it; a pin beside the bundled MiniLM or a local copy is refused, naming it."""
    import transformers

    from webssl_repro.evaluate import alignment_eval, language

    model, tokenizer = object(), object()  # what the hub would give; the features below stand in
    monkeypatch.setattr(language, "lm_layer_features",
                        lambda model, tokenizer, captions, batch_size: torch.zeros(3, len(captions), 8))
    asked = []

    def hub(result):
        def load(source, *args, **kwargs):
            asked.append((source, kwargs.get("revision")))
            return result
        return staticmethod(load)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub(tokenizer))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", hub(model))
    commit = "d04e592bb4f6aa9cfee91e2e20afa771667e1d4b"
    cfg = {"scale": "paper", "lm_paths": {"llama3.1-8b": "meta-llama/Llama-3.1-8B"},
           "lm_revisions": {"llama3.1-8b": commit}}
    for name in ("llama3.1-8b", "meta-llama/Llama-3.1-8B"):
        record = alignment_eval.write_language_features(name, captions_set, cfg, tmp_path / "lm.pt")
        assert asked == [("meta-llama/Llama-3.1-8B", commit)] * 2 and record["revision"] == commit
        asked.clear()
    record = alignment_eval.write_language_features("meta-llama/Llama-3.1-70B", captions_set, cfg, tmp_path / "lm.pt")
    assert asked == [("meta-llama/Llama-3.1-70B", None)] * 2 and "revision" not in record  # unpinned: the newest
    with pytest.raises(ValueError, match=r"lm_revisions: 'd04e592.*' pins a hub id's commit, but 'minilm' is the "
                                         r"bundled copy"):
        alignment_eval.lm_revision("minilm", {"lm_revisions": {"minilm": commit}})
    with pytest.raises(ValueError, match=rf"but evaluate.alignment.lm_paths.llama3.1-8b is a local directory "
                                         rf"\({tmp_path}\)"):
        alignment_eval.lm_revision("llama3.1-8b", {"lm_paths": {"llama3.1-8b": str(tmp_path)},
                                                   "lm_revisions": {"llama3.1-8b": commit}})


def test_language_features_of_other_captions_or_missing_a_model_are_refused(captions_set, tmp_path, monkeypatch,
                                                                             capsys):
    """Features of another caption set (regenerated since) would score the encoder against the
    wrong sentences; a file list without one of the LMs would load it in a one-GPU job; a file
    that is not one (a bare tensor, text) is named, not a traceback from torch."""
    from webssl_repro.cli import main
    from webssl_repro.evaluate import alignment_eval
    from webssl_repro.evaluate.features import save_atomic

    monkeypatch.setattr(alignment_eval, "vision_layers", lambda *a: torch.zeros(2, 256, 4))
    other = tmp_path / "other.pt"
    save_atomic({"language_model": "minilm", "captions": 3, "captions_sha1": "0" * 40,
                 "features": torch.zeros(7, 3, 384)}, other)
    with pytest.raises(ValueError, match=r"other.pt: the features of 'minilm' were computed on 3 other captions "
                                         r"than the 256 of this captions set"):
        alignment_eval.run_alignment(None, {}, captions_set, {"language_models": ["minilm"]}, [other])
    bare, text = tmp_path / "bare.pt", tmp_path / "text.pt"
    torch.save(torch.zeros(7, 3, 384), bare)  # the features alone, without what they were computed on
    text.write_text("features\n")
    pickled = tmp_path / "pickled.pt"  # a class torch's weights-only loader refuses, with advice to trust the file
    torch.save({"features": collections.OrderedDict(a=Fraction(1, 3))}, pickled)
    for path, held in ((bare, "it holds Tensor"), (text, "UnpicklingError: Unsupported operand"),
                       (pickled, r"UnpicklingError: Unsupported global: GLOBAL fractions.Fraction was not an allowed "
                                 r"global by default\)")):
        with pytest.raises(ValueError, match=rf"{path.name}: not a language_features file \(.*({held})") as err:
            alignment_eval.run_alignment(None, {}, captions_set, {"language_models": ["minilm"]}, [path])
        assert not re.search("weights_only|trust", str(err.value))  # torch's advice to unpickle it anyway
    with pytest.raises(FileNotFoundError, match="gone.pt"):  # a missing file is that, not "not a features file"
        alignment_eval.run_alignment(None, {}, captions_set, {"language_models": ["minilm"]}, [tmp_path / "gone.pt"])
    captions = [r["caption"] for r in alignment_eval.load_split(captions_set, "test")]
    mine = tmp_path / "lm-a.pt"
    save_atomic({"language_model": "lm-a", "captions": 256, "captions_sha1": alignment_eval.captions_digest(captions),
                 "features": torch.randn(3, 256, 8)}, mine)
    with pytest.raises(ValueError, match=r"--language-features has no features of \['lm-b'\] \(it has \['lm-a'\]\)"):
        alignment_eval.run_alignment(None, {}, captions_set, {"language_models": ["lm-a", "lm-b"]}, [mine])
    assert main(["evaluate", "classic", "--run", "x", "--encoder", "enc.safetensors", "--out", str(tmp_path / "c.json"),
                 "--language-features", str(mine)]) == 2
    assert "--language-features are the alignment job's language-model features, not an input of classic" in \
        capsys.readouterr().err


def test_pair_hits_give_the_score_and_its_standard_error():
    """The chosen pair's per-caption hits average to its score, clamped as the score is; their
    standard error is the sd over captions / sqrt(N), by hand on 4 captions."""
    from webssl_repro.evaluate.alignment import alignment_se, pair_hits

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 64, 16, generator=g), torch.randn(3, 64, 8, generator=g)
    b[1] = a[2][:, :8] + 0.3 * torch.randn(64, 8, generator=g)
    score, pair = alignment_score(a, b, k=5)
    hits = pair_hits(a, b, pair, k=5)
    assert pair == (2, 1) and hits.shape == (64,) and hits.sum().item() / (64 * 5) == score == 0.3625
    assert pair_hits(a, b, pair, k=5, q=1.0).sum().item() / (64 * 5) == alignment_matrix(a, b, k=5, q=1.0)[2, 1]
    assert alignment_se(torch.tensor([1, 3, 2, 2]), k=2) == pytest.approx(math.sqrt(2 / 3) / 2 / 2)


def test_run_alignment_clamps_each_model_once_and_scores_as_before(monkeypatch):
    """The job's numbers equal the score and standard error of the unclamped layers with the
    clamp inside, for each LM; the thresholds: one for the encoder and one per LM."""
    from webssl_repro.evaluate import alignment, alignment_eval
    from webssl_repro.evaluate.alignment import alignment_se, pair_hits

    g = torch.Generator().manual_seed(7)
    vis = torch.randn(4, 80, 12, generator=g) ** 3
    langs = {"lm-a": torch.randn(3, 80, 10, generator=g) ** 3, "lm-b": vis[1:, :, :10] + torch.randn(3, 80, 10, generator=g)}
    monkeypatch.setattr(alignment_eval, "load_split", lambda manifest, split: [{"caption": str(i)} for i in range(80)])
    monkeypatch.setattr(alignment_eval, "vision_layers", lambda *a: vis)
    monkeypatch.setattr(alignment_eval, "language_layers", lambda name, *a: langs[name])
    calls, threshold = [], alignment.clamp_threshold
    monkeypatch.setattr(alignment, "clamp_threshold", lambda *a, **k: calls.append(1) or threshold(*a, **k))
    for exact in (True, False):
        calls.clear()
        got = alignment_eval.run_alignment(None, {}, "captions.json", {"language_models": list(langs), "k": 5,
                                                                      "q": 0.9, "exact": exact})
        assert len(calls) == 3
        for name, lang in langs.items():
            score, pair = alignment_score(vis, lang, k=5, q=0.9, exact=exact)
            se = alignment_se(pair_hits(vis, lang, pair, k=5, q=0.9, exact=exact), 5)
            assert got[f"alignment/{name}"] == score and got[f"_alignment/{name}/se"] == se
            assert got[f"_alignment/{name}/layers"] == {"vision": pair[0], "language": pair[1]}
    assert got["alignment/lm-b"] > got["alignment/lm-a"]
