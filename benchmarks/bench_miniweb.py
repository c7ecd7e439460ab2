"""Benchmark: mini-web image generation (``data.miniweb.generate``), images/s and ms/image.

Each image is drawn from its seed and index (spec, render, per-pixel noise, mask and depth) in
one process, as ``data.shards.write_shard`` draws every corpus and eval-set image. Timed over
``--images`` images of the default world (``MiniWebConfig``: 64 px, the web kind mix), after
one warm-up image, and per kind with ``--per-kind``. Target: <= 25 ms per image, so that the
mini corpus and eval sets are drawn in seconds, never the bottleneck of the data stage.

Run: ``python benchmarks/bench_miniweb.py [--images 60] [--size 64] [--seed 9] [--per-kind]``
"""
from __future__ import annotations

import argparse
import sys
import time

from webssl_repro.data.miniweb import KINDS, MiniWebConfig, generate

TARGET_MS = 25.0


def per_image_seconds(n: int, seed: int, cfg: MiniWebConfig, kind: str | None = None) -> float:
    generate(seed, 0, cfg, kind=kind)  # warm-up
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        generate(seed, i, cfg, kind=kind)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60, help="timed images (after 1 warm-up)")
    ap.add_argument("--size", type=int, default=MiniWebConfig().size, help="image side in px")
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--per-kind", action="store_true", help="also time each kind of image alone")
    args = ap.parse_args()
    cfg = MiniWebConfig(size=args.size)
    rows = [("web mix", per_image_seconds(args.images, args.seed, cfg))]
    if args.per_kind:
        rows += [(kind, per_image_seconds(args.images, args.seed, cfg, kind)) for kind in KINDS]
    print(f"mini-web generate: {args.images} images of {args.size} px, seed {args.seed}, 1 process")
    print(f"{'kind':12s}{'images/s':>10s}{'ms/image':>10s}")
    for name, sec in rows:
        print(f"{name:12s}{1.0 / sec:10.1f}{1000.0 * sec:10.2f}")
    ms = 1000.0 * rows[0][1]
    print(f"web mix: {ms:.2f} ms/image (target <= {TARGET_MS:g})")
    if ms > TARGET_MS:
        print("WARNING: generation slower than target", file=sys.stderr)


if __name__ == "__main__":
    main()
