"""Diagnostic: can the mini VQA probe read a *perfect* encoder, one whose tokens are the scene's truth?

``probe_vqa_controls.py`` asks whether the probe reads raw pixels; this asks the stronger
question. The ``oracle`` encoder hands the probe, per patch of the mini 4x4 grid, the area
fractions of what the world drew there: each object class, colour, texture and facing, the
word on a sign, and the depth (all from the image's spec, painted far to near like the
renderer). ``blind`` hands it the same tokens zeroed. If the oracle does not beat blind, no
encoder can beat its random init on this probe, whatever it has learned. Not a timing
benchmark; see benchmarks/README.md.

Run: ``python benchmarks/probe_vqa_oracle.py [--train 128] [--test 50] [--set '{"stage2": {"epochs": 4}}']
[--threads 1] [--encoders oracle blind]`` (the same data and ``config/mini.yaml`` settings as ``probe_vqa_controls.py``).
"""
from __future__ import annotations

import hashlib
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from probe_vqa_controls import mini_vqa_data, parse_args, probe
from webssl_repro.data.corpus import read_manifest
from webssl_repro.data.evalsets import eval_seed, vqa_draw
from webssl_repro.data.miniweb import COLOUR_NAMES, OBJECT_CLASSES, TEXTURES, WORDS, MiniWebConfig
from webssl_repro.data.miniweb.render_objects import SKY_DEPTH, shape_mask
from webssl_repro.data.miniweb.world import FACINGS
from webssl_repro.data.loader import make_loader
from webssl_repro.evaluate.imagesets import images_tensor
from webssl_repro.evaluate.vqa.controls import ControlTokens
from webssl_repro.evaluate.vqa.stage import VQA_FIT, vqa_split

GROUPS = (OBJECT_CLASSES, COLOUR_NAMES, TEXTURES, FACINGS)
CHANNELS = sum(map(len, GROUPS)) + len(WORDS) + 1
RENDER = 64  # px at which the truth is painted before pooling to the token grid


def truth_map(spec: dict, grid: int) -> torch.Tensor:
    """(CHANNELS, grid, grid): per-patch area fractions of each attribute value, and mean depth / far."""
    m = np.zeros((CHANNELS, RENDER, RENDER), np.float32)
    depth = np.full((RENDER, RENDER), SKY_DEPTH, np.float32)
    for o in spec["objects"]:  # far to near: a nearer object overwrites what it hides
        mask = shape_mask(o["class"], o["box"], o["facing"], RENDER)
        m[:, mask] = 0.0
        offset = 0
        for values, value in zip(GROUPS, (o["class"], o["colour"], o["texture"], o["facing"])):
            if value in values:
                m[offset + values.index(value), mask] = 1.0
            offset += len(values)
        depth[mask] = o["depth"]
    offset = sum(map(len, GROUPS))
    for t in sorted((t for t in spec["texts"] if t.get("role") == "sign"), key=lambda t: -t["depth"]):
        x0, y0, x1, y1 = (round(v * RENDER) for v in t["box"])
        m[:, y0:y1, x0:x1] = 0.0
        m[offset + WORDS.index(t["string"]), y0:y1, x0:x1] = 1.0
        depth[y0:y1, x0:x1] = t["depth"]
    m[-1] = depth / SKY_DEPTH
    return F.adaptive_avg_pool2d(torch.from_numpy(m)[None], grid)[0]


def vqa_spec(item: dict, split: str) -> dict:
    """Redraw the spec of one VQA eval image as the eval set drew it (``evalsets.vqa_draw``)."""
    benchmark, image_id = item["benchmark"], str(item["image_id"])
    index = int(image_id.split("-")[1])
    specs = [s for _, s in vqa_draw(benchmark, eval_seed(benchmark, split), index, MiniWebConfig())]
    match = [s for s in specs if s["id"] == image_id]
    if not match:
        raise RuntimeError(f"{benchmark} draw {index} of the {split} split ({[s['id'] for s in specs]}) "
                           f"is not image {image_id}")
    return match[0]


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class TruthTokens(ControlTokens):
    """A control encoder that looks each input image up (by its exact pixels) in a table of truth maps."""

    def __init__(self, table: dict[str, torch.Tensor], blind: bool) -> None:
        super().__init__(CHANNELS, blind)
        self.table = table

    def extra_repr(self) -> str:
        return f"blind={self.blind}, images={len(self.table)}"

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        maps = torch.stack([self.table[_key(x)] for x in images])  # KeyError: an image the table lacks
        return maps.flatten(2).transpose(1, 2)


def truth_table(manifests: dict[str, str], size: int, grid: int, alignment_samples: int) -> dict[str, torch.Tensor]:
    """Truth maps keyed by the exact input tensor the VQA stage will hand the encoder."""
    loader = make_loader(read_manifest(manifests["shards"])["shards"], shuffle_shards=False, rank=0, world_size=1)
    pairs = [(s["image"], s["meta"]) for s in itertools.islice(loader, alignment_samples)]  # meta: the full spec
    for split in ("train", "test"):
        for items in vqa_split(manifests["vqa"], split).values():
            pairs += [(it["image"], vqa_spec(it, split)) for it in items]
    return {_key(images_tensor([{"image": image}], size, VQA_FIT)[0]): truth_map(spec, grid) for image, spec in pairs}


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], ("oracle", "blind"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg, size, patch, manifests = mini_vqa_data(args, Path(tmp))
        table = truth_table(manifests, size, size // patch, int(cfg.get("alignment_samples", 1024)))
        for name in args.encoders:
            encoder = TruthTokens(table, blind=name == "blind")
            probe(name, encoder, {"img_size": size, "patch": patch, "depth": 0}, manifests, cfg, Path(tmp))


if __name__ == "__main__":
    main()
