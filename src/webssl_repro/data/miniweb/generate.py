"""Spec -> pixels: one image with its metadata, segmentation mask and depth map."""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from webssl_repro.data.miniweb.layout import sample_spec
from webssl_repro.data.miniweb.render_charts import paint_chart
from webssl_repro.data.miniweb.render_docs import paint_document
from webssl_repro.data.miniweb.render_objects import Canvas, paint_background, paint_objects
from webssl_repro.data.miniweb.render_text import paint_signs
from webssl_repro.data.miniweb.world import MiniWebConfig, rng_for


@dataclasses.dataclass
class Sample:
    """``meta`` is JSON-serialisable; ``seg`` holds ``SEG_CLASSES`` ids, ``depth`` metres."""

    image: Image.Image
    meta: dict[str, Any]
    seg: np.ndarray
    depth: np.ndarray

    def encode_image(self, fmt: str = "png", quality: int = 90) -> bytes:
        buf = io.BytesIO()
        if fmt in ("jpg", "jpeg"):
            self.image.save(buf, format="JPEG", quality=quality)
        else:
            self.image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def render(spec: dict[str, Any], size: int, noise: float = 0.0) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Draw a spec at ``size`` px; deterministic (noise is seeded by the spec's seed and index)."""
    cv = Canvas(size)
    rng = rng_for(spec["seed"], spec["index"], f"pixels:{size}")
    paint_background(cv, spec["background"], rng)
    if spec["chart"] is not None:
        paint_chart(cv, spec["chart"])
    elif spec["document"] is not None:
        paint_document(cv, spec["document"])
    else:
        paint_objects(cv, spec["objects"])
        paint_signs(cv, [t for t in spec["texts"] if t.get("role") == "sign"])
    rgb = cv.rgb
    if noise > 0:
        rgb = rgb + rng.normal(0.0, noise, rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    return img, cv.seg, cv.depth


def generate(seed: int, index: int, cfg: MiniWebConfig | None = None, *, size: int | None = None,
             kind: str | None = None) -> Sample:
    """Image ``index`` of the world drawn from ``seed``; same arguments give identical pixels."""
    cfg = cfg or MiniWebConfig()
    size = int(size or cfg.size)
    spec = sample_spec(seed, index, cfg, kind=kind)
    img, seg, depth = render(spec, size, cfg.noise)
    meta = dict(spec, size=size, noise=cfg.noise)  # enough to redraw this exact image at any size
    return Sample(image=img, meta=meta, seg=seg, depth=depth)
