"""Shared fixtures of the stage tests: a tiny mini-web corpus, eval sets and trained runs.

Everything is built once per test session in a scratch directory. Under pytest-xdist the
workers share the session's base temp dir and take a file lock, so the corpus and the
pretraining runs are built by one worker and reused by the others instead of once each
(they are the slow part on 2 cores).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from webssl_repro.data.stages import build_corpus, build_evalset
from webssl_repro.workflow import Plan

REPO = Path(__file__).resolve().parents[1]

#: Eval-set counts: small enough to build in seconds, large enough for the probes to separate
#: a useful encoder from chance (20 train images per class for k=20 k-NN over 16 classes).
TINY_EVALSETS: dict[str, Any] = {
    "size": 64,
    "classification": {"train": 320, "val": 160},
    "segmentation": {"train": 128, "val": 64},
    "depth": {"train": 128, "val": 64},
    "captions": {"test": 256},
    "vqa": {"train": 40, "test": 20},
}
#: The pretraining corpus has the mini config's size: a run sees the same data as in `make reproduce`.
TINY_CORPUS = {"seed": 0, "n_images": 1024, "shard_size": 256, "size": 64}


def mini_config() -> dict[str, Any]:
    with open(REPO / "config" / "mini.yaml") as fh:
        return yaml.safe_load(fh)


def run_slice(run: str, samples: int | None = None, **train: Any) -> dict[str, Any]:
    """The run's config slice exactly as the workflow passes it (``Plan.run_config``), with
    an optional smaller samples-seen budget and loop settings (log and checkpoint cadence)."""
    cfg = Plan(mini_config()).run_config(run)
    if samples is not None:
        cfg["samples_seen"] = int(samples)
    cfg["train"] = {**cfg["train"], **train}
    return cfg


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``name`` under the session's scratch root, built by ``build`` exactly once per session."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the controller's basetemp, common to all workers of this session
    out = base / name
    with FileLock(str(base / f"{name}.lock")):
        if not (out / ".done").exists():
            out.mkdir(parents=True, exist_ok=True)
            build(out)
            (out / ".done").touch()
    return out


def shared_result(tmp_path_factory: pytest.TempPathFactory, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (JSON-serialisable) once per session, however many xdist workers ask."""
    import json

    def build(out: Path) -> None:
        (out / "result.json").write_text(json.dumps(compute()))

    return json.loads((shared_dir(tmp_path_factory, name, build) / "result.json").read_text())


def build_tiny_data(root: Path) -> None:
    build_corpus(TINY_CORPUS, str(root / "shards" / "manifest.json"))
    for task in ("classification", "segmentation", "depth", "captions", "vqa"):
        build_evalset(task, TINY_EVALSETS, str(root / "evalsets" / f"{task}.json"))


def data_paths(root: Path) -> dict[str, str]:
    paths = {t: str(root / "evalsets" / f"{t}.json")
             for t in ("classification", "segmentation", "depth", "captions", "vqa")}
    paths["shards"] = str(root / "shards" / "manifest.json")
    return paths


def initial_method(run: str, cfg: dict[str, Any], shards_manifest: str):
    """The method a run starts from: ``pretrain`` builds it under the same seed (see
    ``train_run``), so this is the random-init twin of the trained run, weight for weight."""
    from webssl_repro.data.corpus import IndexedCorpus, read_manifest
    from webssl_repro.runs import Run
    from webssl_repro.train.run import build

    corpus = IndexedCorpus(read_manifest(shards_manifest)["shards"], seed=int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))
    return build(Run.parse(run), {**cfg, "_workdir": str(Path(shards_manifest).parent)}, corpus)[0]


def train_run(root: Path, run: str, cfg: dict[str, Any], shards_manifest: str) -> None:
    """``pretrain`` under the run's seed. ``pretrain`` seeds before ``build`` itself; seeding here
    as well keeps ``initial_method`` the exact twin of the run's init even if that changes."""
    from webssl_repro.train.run import pretrain

    torch.manual_seed(int(cfg["seed"]))
    result = pretrain(run, cfg, root / "run", root / "checkpoints", [shards_manifest])
    assert result.complete, f"{run}: stopped at step {result.step}"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """Manifests of the tiny corpus and eval sets: shards, classification, ..., vqa."""
    torch.set_num_threads(1)
    return data_paths(shared_dir(tmp_path_factory, "tiny_data", build_tiny_data))


def trained_run(tmp_path_factory: pytest.TempPathFactory, run: str, shards: str, samples: int | None = None,
                seed: int | None = None, loader: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """``run`` trained on ``shards`` once per session (the grid's budget, or ``samples``; the
    config's seed, or ``seed``; ``pretrain.loader`` settings, which leave the batches as they
    are): its config, run and checkpoint directories."""
    torch.set_num_threads(1)
    cfg = run_slice(run, samples, **train)
    if loader is not None:
        cfg["loader"] = dict(loader)
    name = run if samples is None else f"{run}.{samples}"
    if seed is not None:
        cfg["seed"], name = int(seed), f"{name}.s{seed}"
    root = shared_dir(tmp_path_factory, name, lambda d: train_run(d, run, cfg, shards))
    return {"run": run, "cfg": cfg, "dir": root / "run", "checkpoints": root / "checkpoints", "shards": shards}


#: Web-DINO at the mini "1b" size and "2b" samples seen (2048 = 64 steps of 32): the smallest
#: run of the mini grid, with the mini recipe unchanged.
DINO_RUN = "dino1b-full2b-224"
MAE_RUN = "mae1b-full2b-224"
CLIP_RUN = "clip1b-full2b-224"


@pytest.fixture(scope="session")
def dino_run(tmp_path_factory, tiny_data) -> dict[str, Any]:
    return trained_run(tmp_path_factory, DINO_RUN, tiny_data["shards"], log_every=1)


#: Loop settings of the probe runs, which no test resumes: one checkpoint, at the end. The mini
#: config's every 50 steps took ~5 % of a probe run's trainer (py-spy, 300 steps).
PROBE_LOOP = {"checkpoint_every": 1 << 20}


#: Samples seen of the run the evaluation probes compare with its init: 8192 steps of 32 (256
#: passes over the mini corpus). Only the budget differs from ``DINO_RUN``. The grid's 64-step
#: runs move no probe beyond seed noise. At 2048 steps the dense probes and alignment separate,
#: but the class (the objects' shape) barely moves: k-NN +2.5 points on 960 images. At 8192 it
#: gains +7.2 to +8.0 (seeds 0-2; benchmarks/README.md).
PROBE_SAMPLES = 262144


@pytest.fixture(scope="session")
def dino_probe_run(tmp_path_factory, tiny_data) -> dict[str, Any]:
    """The suite's longest job: one dataloader worker assembles its batches (the same batches,
    tests/test_indexed_corpus.py) beside the trainer, on CPU time the other xdist worker leaves
    idle while it waits (SLURM polls, subprocesses)."""
    return trained_run(tmp_path_factory, DINO_RUN, tiny_data["shards"], PROBE_SAMPLES, loader={"workers": 1},
                       log_every=32, **PROBE_LOOP)


#: CLIP's probe: 512 steps of 64 on an 8192-image corpus (the mini corpus's generator and seed,
#: 8x the images). CLIP learns from caption variety: on the 1024-image corpus, 256 steps leave
#: top-1 at 3-6 hits of 256 held-out captions (median rank 50-60) and at 1024 steps a seed overfits; with
#: 8192 images 512 steps reach top-5 29-32 hits (top-1 1-8), median rank 28-29 (measured, seeds 0-2).
CLIP_PROBE_SAMPLES = 32768
CLIP_PROBE_CORPUS = {**TINY_CORPUS, "n_images": 8192, "shard_size": 1024}


def clip_probe_run(tmp_path_factory: pytest.TempPathFactory, shards: str, seed: int) -> dict[str, Any]:
    """The CLIP probe run of ``seed`` on ``shards`` (``clip_probe_shards``), trained once per session."""
    return trained_run(tmp_path_factory, CLIP_RUN, shards, CLIP_PROBE_SAMPLES, seed=seed, **PROBE_LOOP)


@pytest.fixture(scope="session")
def clip_probe_shards(tmp_path_factory) -> str:
    """Manifest of CLIP_PROBE_CORPUS (images 0-1023 are the tiny corpus's own)."""
    root = shared_dir(tmp_path_factory, "clip_probe_corpus",
                      lambda d: build_corpus(CLIP_PROBE_CORPUS, str(d / "shards" / "manifest.json")))
    return str(root / "shards" / "manifest.json")


#: A larger IN-1k analogue for the linear probe: 960 val images put one standard error of a
#: top-1 near 10 % at ~1 point (160 in TINY_EVALSETS: ~2.4). Its first 320 / 160 images are
#: TINY_EVALSETS' own.
IN1K_PROBE_EVALSET = {"size": 64, "classification": {"train": 640, "val": 960}}


@pytest.fixture(scope="session")
def in1k_probe_set(tmp_path_factory) -> str:
    root = shared_dir(tmp_path_factory, "in1k_probe_set", lambda d: build_evalset(
        "classification", IN1K_PROBE_EVALSET, str(d / "classification.json")))
    return str(root / "classification.json")


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory, tiny_data) -> dict[str, Any]:
    return trained_run(tmp_path_factory, MAE_RUN, tiny_data["shards"], log_every=1)


@pytest.fixture(scope="session")
def dino_encoders(dino_probe_run, tiny_data):
    """(trained, random-init, meta): the probe run's exported encoder and the encoder it started as."""
    from webssl_repro.models.io import load_encoder

    trained, meta = load_encoder(dino_probe_run["dir"] / "encoder.safetensors")
    method = initial_method(DINO_RUN, dino_probe_run["cfg"], tiny_data["shards"])
    random_init = copy.deepcopy(method.encoder()).eval().requires_grad_(False)
    return trained, random_init, meta
