"""Classic probes on sets too large for memory (ImageNet, ADE20K, NYUd at paper scale): images
are read lazily, the dense probes stream the encoder per batch and the linear probe's
features go to disk, with the in-memory path's numbers (same seeded batches and heads; float
rounding only). Forced here on the tiny sets by setting the in-memory limit to 0; without
augmentation, which leaves no tokens to cache (tests/test_dense_augment.py checks that path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_mini import tiny_data  # noqa: F401  (fixture)

DENSE = {"batch_size": 64, "seed": 0,
         "segmentation": {"iters": 12, "lr": 0.01, "warmup": 2, "batch_size": 16, "img_size": 32,
                          "augment": False},
         "depth": {"iters": 12, "lr": 0.03, "warmup": 2, "sig_warmup": 0, "batch_size": 16, "img_size": 32,
                   "max_depth": 10.0, "augment": False},
         "linear": {"epochs": 2, "epoch_length": 20, "lrs": [0.01, 0.1]}}


def _encoder():
    from webssl_repro.models.vit import Arch, build_encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder = build_encoder(Arch(width=32, depth=4, heads=2, patch=8), "dino", img_size=32, layerscale=1.0)
    return encoder.eval().requires_grad_(False), {"img_size": 32, "patch": 8, "depth": 4}


@pytest.mark.parametrize("task", ["classification", "segmentation", "depth"])
def test_streaming_equals_in_memory(tiny_data, monkeypatch, tmp_path, task):  # noqa: F811
    """In memory (workers 0) against out of memory with a decoding worker. Classification
    differs only by the float16 features on disk: at most one val image changes class."""
    from webssl_repro.evaluate import classic, features
    from webssl_repro.evaluate.imagesets import load_split

    encoder, meta = _encoder()
    cached = getattr(classic, task)(encoder, meta, tiny_data[task], classic.classic_config(DENSE))
    monkeypatch.setattr(features, "IN_MEMORY_BYTES", 0)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    streamed = getattr(classic, task)(encoder, meta, tiny_data[task],
                                      classic.classic_config({**DENSE, "workers": 1, "scratch": str(scratch)}))
    assert list(scratch.iterdir()) == []  # the features on disk are removed with their directory
    assert cached.keys() == streamed.keys() and len(cached) == 2
    if task == "classification":
        one_image = 100.0 / len(load_split(tiny_data[task], "val"))
        assert abs(streamed["in1k_linear"] - cached["in1k_linear"]) <= one_image + 1e-9, (cached, streamed)
        return
    for name in cached:
        assert streamed[name] == pytest.approx(cached[name], rel=1e-3, abs=1e-3), (name, cached, streamed)


def test_linear_features_go_to_disk_past_the_memory_limit(tiny_data, monkeypatch, tmp_path):  # noqa: F811
    from webssl_repro.evaluate import features
    from webssl_repro.evaluate.imagesets import EvalImages, image_loader, in_order, load_split

    encoder, _ = _encoder()
    images = EvalImages(load_split(tiny_data["classification"], "val"), 32, "label")
    n = len(images)
    in_memory = features.linear_features(encoder, image_loader(images, in_order(n, 16)), n, 4)
    monkeypatch.setattr(features, "IN_MEMORY_BYTES", 0)
    with pytest.raises(ValueError, match="scratch"):
        features.linear_features(encoder, image_loader(images, in_order(n, 16)), n, 4)
    # batches in any order land at their sample index
    shuffled = [torch.arange(n)[i:i + 16] for i in range(0, n, 16)][::-1]
    on_disk = features.linear_features(encoder, image_loader(images, shuffled), n, 4, scratch=tmp_path)
    assert (tmp_path / "linear_features.f16").stat().st_size == 2 * 5 * n * 32
    assert on_disk["cls"].dtype == torch.float16 and on_disk["cls"].shape == (4, n, 32)
    assert torch.equal(on_disk["labels"], in_memory["labels"])
    for key in ("cls", "avgpool"):
        assert torch.allclose(on_disk[key].float(), in_memory[key], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=f"covered 16 of {n}"):
        features.linear_features(encoder, image_loader(images, shuffled[:1]), n, 4, scratch=tmp_path)


def test_depth_without_max_depth_needs_it_set_when_streaming(tiny_data, monkeypatch):  # noqa: F811
    from webssl_repro.evaluate import classic, features

    encoder, meta = _encoder()
    monkeypatch.setattr(features, "IN_MEMORY_BYTES", 0)
    cfg = classic.classic_config({**DENSE, "depth": {**DENSE["depth"], "max_depth": None}})
    with pytest.raises(ValueError, match="evaluate.classic.depth.max_depth"):
        classic.depth(encoder, meta, tiny_data["depth"], cfg)


class _CountingRows:
    """A `datasets.Dataset` stand-in that records which rows were read."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return {"image": Image.fromarray(np.full((8, 8, 3), i % 256, dtype=np.uint8)), "label": i}


def test_hf_split_decodes_only_the_rows_read():
    from webssl_repro.data.real_evalsets import build_hf_manifest, load_hf_split

    rows = _CountingRows(1000)
    split = load_hf_split(build_hf_manifest("classification", {"limit": 300}), "train", rows)
    assert len(split) == 300 and rows.read == []
    assert split[7]["label"] == 7 and split[-1]["label"] == 299 and rows.read == [7, 299]
    with pytest.raises(IndexError):
        split[300]
    assert [r["label"] for r in split[2:5]] == [2, 3, 4]


class _Decoders:
    """Eval images that leave a file named after each process that decodes one."""

    def __init__(self, images, marks):
        self.images, self.marks = images, marks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import os

        (self.marks / str(os.getpid())).touch()
        return self.images[index]


def test_image_loader_with_workers_gives_the_same_batches(tiny_data, tmp_path):  # noqa: F811
    import os

    from webssl_repro.evaluate.imagesets import EvalImages, image_loader, load_split, seeded_batches

    images = EvalImages(load_split(tiny_data["segmentation"], "val"), 24, "seg")

    def first(workers: int, k: int = 5):
        marks = tmp_path / f"workers{workers}"
        marks.mkdir()
        stream = image_loader(_Decoders(images, marks), seeded_batches(len(images), 8, seed=3), workers)
        batches = [next(stream) for _ in range(k)]
        return batches, {int(p.name) for p in marks.iterdir()}

    (here, here_pids), (ahead, worker_pids) = first(0), first(2)
    assert here_pids == {os.getpid()} and len(worker_pids) == 2 and os.getpid() not in worker_pids
    for (i0, x0, y0), (i1, x1, y1) in zip(here, ahead):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
        assert x0.shape == (8, 3, 24, 24) and y0.dtype == torch.long and y0.shape == (8, 24, 24)


def test_paper_config_runs_the_full_size_sets():
    """paper.yaml's classic section is valid, decodes in the job's spare CPUs and sets the depth
    bins' top (a streamed NYUd cannot be scanned for it)."""
    from pathlib import Path

    from webssl_repro.config import load_config
    from webssl_repro.evaluate.classic import classic_config, dense_size
    from webssl_repro.workflow import Plan

    paper = load_config(Path(__file__).resolve().parents[1] / "config" / "paper.yaml")
    cfg = classic_config(paper["evaluate"]["classic"])
    assert cfg["depth"]["max_depth"] == 10.0 and cfg["precision"] == "bf16"
    assert 0 < cfg["workers"] < Plan(paper).eval_threads("classic") == 8
    # DINOv2's dense resolutions (the encoder centre-pads them to its 14-px grid, as DINOv2 does)
    meta = {"img_size": 224, "patch": 14}
    assert dense_size(cfg["segmentation"], meta) == (512, 512) and dense_size(cfg["depth"], meta) == (480, 640)
    # and their training augmentations: random 512-px crops, and 416 x 544 crops of NYUd's cut frames
    assert cfg["segmentation"]["augment"] and cfg["depth"]["augment"] and cfg["depth"]["nyu_crop"]
    assert cfg["depth"]["train_crop"] == [416, 544]
    assert dense_size(cfg["segmentation"], meta, "ms_img_size") == (640, 640)  # "+ms": DINOv2's 640 px
    # NYUd's loss as DINOv2's code computes it: SigLoss per GPU's 2 images, no gradient term
    assert cfg["depth"]["samples_per_gpu"] == 2 and cfg["depth"]["grad_weight"] == 0.0
    assert cfg["linear"]["batch_size"] == 1024


def test_dense_probes_at_a_non_square_size_off_the_patch_grid(tiny_data, monkeypatch):  # noqa: F811
    """NYUd's frames are 4:3: a dense task's img_size may be [h, w], masks and depth maps
    follow their image. A size off the patch grid (DINOv2's 512-px crops, 480 x 640 frames at
    patch 14) reaches the encoder centre-padded to it: here 24 x 36 as 24 x 40."""
    from webssl_repro.evaluate import classic, features

    encoder, meta = _encoder()
    shapes = []
    forward = encoder.forward_intermediates
    monkeypatch.setattr(encoder, "forward_intermediates",
                        lambda x, *a, **kw: shapes.append(tuple(x.shape[-2:])) or forward(x, *a, **kw))
    cfg = classic.classic_config({**DENSE, "segmentation": {**DENSE["segmentation"], "img_size": [24, 36]},
                                  "depth": {**DENSE["depth"], "img_size": [24, 36]}})
    seg = classic.segmentation(encoder, meta, tiny_data["segmentation"], cfg)
    dep = classic.depth(encoder, meta, tiny_data["depth"], cfg)
    assert 0.0 < seg["ade20k_linear"] <= 100.0 and 0.0 < dep["nyud_lin1"] < 10.0, (seg, dep)
    assert classic.dense_size({"img_size": [24, 36]}, meta) == (24, 36) and (24, 40) in shapes
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in shapes), set(shapes)
    x = torch.rand(1, 3, 24, 36)
    padded = features.pad_to_multiple(x, 8)  # 2 zero columns on each side, as DINOv2's CenterPadding
    assert padded.shape[-2:] == (24, 40) and torch.equal(padded[..., 2:38], x) and not padded[..., :2].any()
    with pytest.raises(ValueError, match=r"img_size \[0, 36\]: sizes must be positive"):
        classic.dense_size({"img_size": [0, 36]}, meta)


def test_linear_probe_trains_at_the_configured_global_batch(tiny_data, monkeypatch):  # noqa: F811
    """DINOv2's linear eval runs 128 images on each of 8 GPUs: a global batch of 1024 by
    default (capped at the training set), smaller where the config says so (mini: 128)."""
    from webssl_repro.evaluate import classic, classification
    from webssl_repro.evaluate.imagesets import load_split

    encoder, meta = _encoder()
    probe, seen = classification.linear_probe, []
    monkeypatch.setattr(classification, "linear_probe",
                        lambda *a, **kw: seen.append(kw["batch_size"]) or probe(*a, **kw))
    n_train = len(load_split(tiny_data["classification"], "train"))
    for batch in (8, None):
        linear = {**DENSE["linear"], **({} if batch is None else {"batch_size": batch})}
        cfg = classic.classic_config({**DENSE, "linear": linear})
        classic.classification(encoder, meta, tiny_data["classification"], cfg)
    assert classic.DEFAULTS["linear"]["batch_size"] == 1024 and seen == [8, min(1024, n_train)]


def test_depth_batch_must_split_into_gpu_pairs(tiny_data):  # noqa: F811
    """SigLoss is taken per samples_per_gpu images: a batch that does not split is refused by
    name before any training, counting the cap at the training set's size."""
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate.imagesets import load_split

    encoder, meta = _encoder()
    n_train = len(load_split(tiny_data["depth"], "train"))
    with pytest.raises(ValueError, match=r"evaluate.classic.depth: a batch of 3 \(batch_size 3"):
        classic.depth(encoder, meta, tiny_data["depth"], classic.classic_config(
            {**DENSE, "depth": {**DENSE["depth"], "batch_size": 3}}))
    # samples_per_gpu that splits the batch asked for but not its cap, the training set's size
    per_gpu = next(k for k in range(3, n_train) if (10 * n_train) % k == 0 and n_train % k)
    cfg = {**DENSE, "depth": {**DENSE["depth"], "batch_size": 10 * n_train, "samples_per_gpu": per_gpu}}
    with pytest.raises(ValueError, match=f"evaluate.classic.depth: a batch of {n_train} "):
        classic.depth(encoder, meta, tiny_data["depth"], classic.classic_config(cfg))
