"""Diagnostic: does the mini NYUd probe train long enough to read its encoder?

Trains ``classic.depth`` (lin.1 and lin.4, the mini config's recipe) for several iteration
counts on two inputs: a trained mini encoder, and zero tokens of the same shape (on which the
1x1 head can learn only its bias: one depth everywhere). Beside them, the two answers that
ignore the image (``evaluate.no_image``): the best single depth, and each pixel's mean
training depth at its place (the position prior), the better of which is the bar the classic
tables mark numbers against. A probe trained long enough should bring the zero tokens to the
single depth's score. Not a timing benchmark: it records what the mini depth numbers can
measure (benchmarks/README.md).

Run after ``make reproduce`` (it reads the mini encoder and eval set):
``python benchmarks/probe_depth_budget.py [--encoder results/mini/runs/dino7b-full8b-224/encoder.safetensors]
[--iters 100 300 1000] [--threads 1]``
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from webssl_repro.evaluate.classic import classic_config, depth, depth_range
from webssl_repro.evaluate.no_image import depth_answers, split_targets
from webssl_repro.models.io import load_encoder

ROOT = Path(__file__).resolve().parents[1]


class ZeroTokens(nn.Module):
    """``depth`` blocks of zero tokens (CLS + one per patch) at ``embed_dim``: nothing of the
    image, not even where a patch is."""

    num_prefix_tokens = 1

    def __init__(self, embed_dim: int, patch: int, depth: int) -> None:
        super().__init__()
        self.embed_dim, self.patch, self.depth = embed_dim, patch, depth

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        n = (images.shape[-2] // self.patch) * (images.shape[-1] // self.patch)
        return [images.new_zeros(images.shape[0], 1 + n, self.embed_dim)] * self.depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", type=Path, default=ROOT / "results/mini/runs/dino7b-full8b-224/encoder.safetensors")
    ap.add_argument("--evalset", type=Path, default=ROOT / "results/mini/data/evalsets/depth.json")
    ap.add_argument("--iters", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for path in (args.encoder, args.evalset):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run `make reproduce` first, or pass --encoder / --evalset")
    torch.set_num_threads(args.threads)
    mini = yaml.safe_load((ROOT / "config/mini.yaml").read_text())["evaluate"]["classic"]
    encoder, meta = load_encoder(args.encoder)
    zeros = ZeroTokens(encoder.embed_dim, int(meta["patch"]), int(meta["depth"]))
    dep = classic_config(mini)["depth"]
    train, val = split_targets(args.evalset, "train", "depth"), split_targets(args.evalset, "val", "depth")
    answers = depth_answers(train, val, depth_range(dep, train()), bool(dep["eigen_crop"]))
    (single, at), prior = answers["uniform"], answers["position"][0]
    print(f"{args.encoder.parent.name}; mini depth recipe {dict(mini['depth'])}; warm-up 10 % of iters")
    print(f"without the image: one depth RMSE {single:.3f} m (every pixel at {at:.2f} m); "
          f"position prior {prior:.3f} m")
    print(f"{'iters':>6s} {'input':>8s} {'lin.1':>7s} {'lin.4':>7s} {'s':>6s}")
    for iters in args.iters:
        cfg = classic_config({**mini, "depth": {**mini["depth"], "iters": iters, "warmup": max(1, iters // 10)}})
        for name, model in (("encoder", encoder), ("zeros", zeros)):
            t0 = time.perf_counter()
            scores = depth(model, meta, args.evalset, cfg)
            print(f"{iters:6d} {name:>8s} {scores['nyud_lin1']:7.3f} {scores['nyud_lin4']:7.3f} "
                  f"{time.perf_counter() - t0:6.1f}", flush=True)


if __name__ == "__main__":
    main()
