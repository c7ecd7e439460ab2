"""Diagnostic: what a mini pretraining run has learned, read by k-NN on the IN-1k analogue.

Trains one run of the mini grid (``config/mini.yaml``, recipe unchanged) for ``--samples``
samples seen on a generated corpus, then compares its exported encoder with the encoder it
started from (same seed, rebuilt exactly as ``pretrain`` builds it) by DINO's weighted k-NN
(k=20, T=0.07, CLS token) of three targets: the object's class (its shape), its colour and
its texture, which the world draws independently of the class; raw pixels as a reference.
Not a timing benchmark: it records what the mini budget buys (see benchmarks/README.md).

Run: ``python benchmarks/probe_learning.py [--run dino1b-full2b-224] [--samples 65536]
[--seed 0] [--corpus 1024] [--source web|in1k] [--train 640] [--val 960] [--threads 1]
[--set '{"arch": {"patch": 4}}']`` (``--set``: JSON overrides of the run's config, e.g. a variant recipe)
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from webssl_repro.data.corpus import IndexedCorpus, read_manifest
from webssl_repro.data.stages import build_corpus, build_evalset
from webssl_repro.evaluate.imagesets import load_split
from webssl_repro.evaluate.knn import attribute_knn, object_attributes
from webssl_repro.models.io import load_encoder
from webssl_repro.runs import Run
from webssl_repro.settings import merge_nested
from webssl_repro.train.run import build, pretrain
from webssl_repro.workflow import shipped_plan


def run_config(run: str, samples: int, seed: int, overrides: dict | None = None) -> dict:
    cfg = merge_nested(shipped_plan("mini").run_config(run), overrides or {})
    return {**cfg, "samples_seen": int(samples), "seed": int(seed), "train": {**cfg["train"], "log_every": 64}}


def initial_encoder(run: str, cfg: dict, manifest: str):
    """The encoder ``pretrain`` starts from: ``build`` under the run's seed."""
    corpus = IndexedCorpus(read_manifest(manifest)["shards"], seed=int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))
    method = build(Run.parse(run), {**cfg, "_workdir": str(Path(manifest).parent)}, corpus)[0]
    return copy.deepcopy(method.encoder()).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="dino1b-full2b-224")
    ap.add_argument("--samples", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=int, default=1024, help="corpus images (the mini config has 1024)")
    ap.add_argument("--source", choices=("web", "in1k"), default="web",
                    help="pretraining images: the mini-web corpus or the IN-1k analogue's own (in1k runs)")
    ap.add_argument("--train", type=int, default=640, help="labelled k-NN train images")
    ap.add_argument("--val", type=int, default=960, help="labelled k-NN val images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", default="{}", help="JSON overrides of the run's config (arch, img_size, recipe)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = f"{tmp}/shards/manifest.json"
        # The seed is the source's default (mini-web 0, IN-1k analogue 1), as in config/mini.yaml.
        build_corpus({"n_images": args.corpus, "shard_size": 256, "size": 64}, manifest, source=args.source)
        evalset = f"{tmp}/evalsets/classification.json"
        build_evalset("classification", {"size": 64, "classification": {"train": args.train, "val": args.val}},
                      evalset)
        cfg = run_config(args.run, args.samples, args.seed, json.loads(args.set))
        init = initial_encoder(args.run, cfg, manifest)
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        pretrain(args.run, cfg, f"{tmp}/run", f"{tmp}/checkpoints", [manifest])
        seconds = time.perf_counter() - t0
        trained, meta = load_encoder(f"{tmp}/run/encoder.safetensors")
        records = {split: load_split(evalset, split) for split in ("train", "val")}
        table = attribute_knn({"trained": trained, "init": init}, records, int(meta["img_size"]))
    print(f"{args.run}, {args.samples} samples seen, seed {args.seed}, {args.corpus}-image corpus: "
          f"trained in {seconds:.0f} s; k-NN top-1 % on {args.val} val images ({args.train} train)")
    print(f"{'target':10s}{'trained':>10s}{'init':>10s}{'pixels':>10s}{'chance':>10s}")
    for attribute, row in table.items():
        chance = 100.0 / len(object_attributes()[attribute])
        print(f"{attribute:10s}{row['trained']:10.1f}{row['init']:10.1f}{row['pixels']:10.1f}{chance:10.1f}")
    print(json.dumps({"run": args.run, "samples": args.samples, "seed": args.seed, "set": json.loads(args.set),
                      "knn": table}))


if __name__ == "__main__":
    main()
