"""Benchmark: pretraining data throughput, images/s per worker, on generated mini-web shards.

Two readers, each with num_workers 0 and 1: ``IndexedCorpus.batches`` (what ``pretrain``
uses by default: images held decoded in memory, augmentation seeded per sample) and
``data.loader.make_loader`` (the streaming reader for real shards). Each with the mini augmentation of a method:
DINO multi-crop (2 global + 4 local crops at the mini "224" = 32 px), MAE and CLIP crops,
built exactly as ``train.run.build`` builds them from config/mini.yaml. Target: a worker
feeds more images/s than one training process consumes (``bench_dino_step.py``: a mini
dino1b step of 32 images), so that data loading never bounds the mini runs.

Run: ``python benchmarks/bench_loader.py [--images 512] [--batches 8] [--threads 1]``
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from webssl_repro.data.corpus import IndexedCorpus, read_manifest
from webssl_repro.data.loader import make_loader
from webssl_repro.data.stages import build_corpus
from webssl_repro.runs import Run
from webssl_repro.train.run import build
from webssl_repro.workflow import shipped_plan

RUNS = {"dino": "dino1b-full2b-224", "mae": "mae1b-full2b-224", "clip": "clip1b-full2b-224"}


def pipeline(method: str, corpus: IndexedCorpus, workdir: str):
    cfg = shipped_plan("mini").run_config(RUNS[method])
    _, sample_fn, collate_fn, train_map, _ = build(Run.parse(RUNS[method]), {**cfg, "_workdir": workdir}, corpus)
    return sample_fn, collate_fn, int(train_map["global_batch_size"])


class _Augment:
    """make_loader transform: decoded shard sample -> augmented sample, seeded by its key
    (picklable, so a DataLoader worker can run it)."""

    def __init__(self, sample_fn) -> None:
        self.sample_fn = sample_fn

    def __call__(self, s):
        gen = torch.Generator().manual_seed(hash(s["__key__"]) % 2**31)
        return self.sample_fn(s["image"], s["meta"], gen)


class _Collate:
    def __init__(self, collate_fn) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples):
        return self.collate_fn(samples, torch.Generator().manual_seed(0))


def rate_indexed(corpus: IndexedCorpus, sample_fn, collate_fn, batch: int, n_batches: int) -> float:
    it = corpus.batches(0, 0, 1, batch, sample_fn, collate_fn)
    next(it)  # warm-up (and worker start-up)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def rate_loader(shards: list[str], sample_fn, collate_fn, batch: int, n_batches: int, workers: int) -> float:
    loader = make_loader(shards, batch_size=batch, num_workers=workers, samples=(n_batches + 1) * batch,
                         transform=_Augment(sample_fn), collate_fn=_Collate(collate_fn), rank=0, world_size=1)
    it = iter(loader)
    next(it)  # warm-up (and worker start-up)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512, help="corpus size (generated in a temp dir)")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_corpus({"seed": 0, "n_images": args.images, "shard_size": 128, "size": 64}, f"{tmp}/manifest.json")
        shards = read_manifest(f"{tmp}/manifest.json")["shards"]
        corpora = [IndexedCorpus(shards, workers=w) for w in (0, 1)]
        print(f"mini-web shards: {args.images} images of 64 px in {len(shards)} shards; "
              f"{args.batches} timed batches after 1 warm-up; {args.threads} torch thread(s)")
        print(f"{'method':8s}{'batch':>6s}" + "".join(f"{name + ' w=' + str(w):>20s}" for name in
                                                     ("IndexedCorpus", "make_loader") for w in (0, 1))
              + "   (images/s per worker)")
        for method in RUNS:
            sample_fn, collate_fn, batch = pipeline(method, corpora[0], tmp)
            rates = [rate_indexed(c, sample_fn, collate_fn, batch, args.batches) for c in corpora]
            rates += [rate_loader(shards, sample_fn, collate_fn, batch, args.batches, w) for w in (0, 1)]
            print(f"{method:8s}{batch:6d}" + "".join(f"{r:20.0f}" for r in rates))


if __name__ == "__main__":
    main()
