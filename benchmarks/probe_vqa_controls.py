"""Diagnostic: can the mini VQA probe tell an encoder that sees the image from one that sees nothing?

Runs the mini VQA stage (``evaluate.vqa.stage.run_vqa``, ``config/mini.yaml`` settings, optional
overrides) with two control encoders on the same data: ``pixels``, whose patch tokens are the raw
8x8x3 pixels of each patch (every bit of the image, none of it digested), and ``blind``, the
same tokens zeroed. A probe that reads images must score ``pixels`` above ``blind``; a trained
encoder can only beat its init on a probe that does. Not a timing benchmark: it records what
the mini probe can measure (see benchmarks/README.md).

Run: ``python benchmarks/probe_vqa_controls.py [--train 128] [--test 50] [--set '{"stage2": {"epochs": 3}}']
[--threads 1] [--encoders pixels blind]`` (eval sets generated in a temp dir; the corpus is the mini size, 1024 images).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from webssl_repro.data.stages import build_corpus, build_evalset
from webssl_repro.evaluate.vqa.controls import CONTROLS, control_encoder
from webssl_repro.evaluate.vqa.stage import run_vqa
# ``--set`` overrides laid onto a config section, nested sections merged. A key the section
# lacks is kept, not refused: a section lists only what it changes from its consumer's
# defaults, and the consumer names a misspelt key (``VqaConfig.from_mapping``, the recipe
# dataclasses, the ViT arch).
from webssl_repro.settings import merge_nested as merged

CONFIG = Path(__file__).resolve().parents[1] / "config" / "mini.yaml"


def parse_args(description: str, encoders: tuple[str, ...]) -> argparse.Namespace:
    """The shared options; ``--encoders`` picks some of ``encoders`` (two processes can split a pair)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--encoders", nargs="+", choices=encoders, default=list(encoders))
    ap.add_argument("--train", type=int, default=128, help="instruction samples per benchmark (mini: 128)")
    ap.add_argument("--test", type=int, default=50, help="test questions per benchmark (mini: 50)")
    ap.add_argument("--set", default="{}", help="JSON overrides of evaluate.vqa")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def mini_vqa_data(args: argparse.Namespace, root: Path) -> tuple[dict, int, int, dict[str, str]]:
    """(evaluate.vqa config, image size, patch, manifests): the mini corpus and VQA sets under ``root``."""
    mini = yaml.safe_load(CONFIG.read_text())
    cfg = merged(mini["evaluate"]["vqa"], json.loads(args.set))
    size = int(mini["labels"]["resolutions"]["224"])
    patch = int(mini["labels"]["sizes"]["1b"]["patch"])
    (root / "shards").mkdir()
    build_corpus(dict(mini["data"]["corpus"]), str(root / "shards" / "manifest.json"))
    evalsets = mini["data"]["evalsets"]
    build_evalset("vqa", {"size": evalsets["size"], "vqa": {"train": args.train, "val": 16, "test": args.test}},
                  str(root / "vqa.json"))
    return cfg, size, patch, {"vqa": str(root / "vqa.json"), "shards": str(root / "shards" / "manifest.json")}


def probe(name: str, encoder, meta: dict, manifests: dict[str, str], cfg: dict, root: Path) -> None:
    """One VQA stage with ``encoder``; prints its scores and each LM stage's final loss as JSON."""
    t0 = time.perf_counter()
    metrics = run_vqa(encoder, meta, manifests, cfg, root / name)
    scores = {k: round(float(v), 2) for k, v in metrics.items() if not k.startswith("_")}
    losses = [round(float(stage["final_loss"]), 3) for stage in metrics["_training"]]
    print(json.dumps({"encoder": name, "seconds": round(time.perf_counter() - t0, 1), "final_losses": losses,
                      **scores}), flush=True)


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], CONTROLS)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, size, patch, manifests = mini_vqa_data(args, Path(tmp))
        for name in args.encoders:
            probe(name, *control_encoder(name, size, patch), manifests, cfg, Path(tmp))


if __name__ == "__main__":
    main()
