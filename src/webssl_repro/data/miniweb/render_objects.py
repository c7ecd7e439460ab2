"""Pixels for object scenes: backgrounds with a ground-plane depth, and 16 object shapes.

Each class is a few filled primitives in a unit box so shape (not colour) carries the class;
directional classes (arrow, car, fish) mirror or rotate with ``facing``. Every painted
pixel also writes the segmentation id and the object's distance, so the mask and depth map
agree with the image by construction.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from webssl_repro.data.miniweb.layout import HORIZON, NEAR
from webssl_repro.data.miniweb.world import COLOURS, SEG_ID

SKY_DEPTH = 20.0
Poly = Sequence[tuple[float, float]]


class Canvas:
    """An RGB float image plus its segmentation ids and depth, painted back to front."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.seg = np.zeros((size, size), np.uint8)
        self.depth = np.full((size, size), SKY_DEPTH, np.float32)

    def paint(self, mask: np.ndarray, colour: np.ndarray, seg_id: int, depth: float) -> None:
        self.rgb[mask] = colour[mask] if colour.ndim == 3 else colour
        self.seg[mask] = seg_id
        self.depth[mask] = depth


def ground_depth(size: int) -> np.ndarray:
    """Distance per row for a camera looking at a ground plane; above the horizon is far wall/sky."""
    y = (np.arange(size, dtype=np.float32) + 0.5) / size
    with np.errstate(divide="ignore"):
        d = NEAR * (1 - HORIZON) * 0.95 / (y - HORIZON)
    d = np.where(y > HORIZON + 1e-3, np.clip(d, 1.0, SKY_DEPTH), SKY_DEPTH)
    return np.repeat(d[:, None], size, axis=1).astype(np.float32)


def paint_background(cv: Canvas, bg: dict[str, Any], rng: np.random.Generator) -> None:
    s = cv.size
    c1, c2 = (np.asarray(c, np.float32) for c in bg["colours"])
    y = ((np.arange(s, dtype=np.float32) + 0.5) / s)[:, None, None]
    x = ((np.arange(s, dtype=np.float32) + 0.5) / s)[None, :, None]
    style = bg["style"]
    if style == "horizon":
        img = np.where(y < HORIZON, c1 * (0.8 + 0.2 * y / HORIZON), c2 * (0.7 + 0.3 * y)) + 0 * x
    elif style == "gradient":
        img = c1 * (1 - y) + c2 * y + 0 * x
    elif style == "stripes":
        img = np.where(((x + y) / bg["period"]).astype(int) % 2 == 0, c1, c2)
    elif style == "noise":
        coarse = rng.random((8, 8)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((s, s), Image.BILINEAR), np.float32)[..., None] / 255
        img = c1 * (1 - t) + c2 * t
    else:
        img = c1 + 0 * x * y
    cv.rgb[:] = img
    cv.depth[:] = ground_depth(s)


def _star(n: int = 5, inner: float = 0.45) -> Poly:
    pts = []
    for k in range(2 * n):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        a = -np.pi / 2 + k * np.pi / n
        pts.append((0.5 + r * np.cos(a), 0.5 + r * np.sin(a)))
    return pts


ARROW_RIGHT: Poly = [(0, 0.35), (0.55, 0.35), (0.55, 0.05), (1, 0.5), (0.55, 0.95), (0.55, 0.65), (0, 0.65)]
STAR: Poly = _star()


def _shape_ops(cls: str) -> list[tuple[str, Any, int]]:
    """Primitive list (op, unit geometry, fill) for a right-/up-facing instance of ``cls``."""
    ops = {
        "ball": [("ellipse", (0, 0, 1, 1), 255)],
        "box": [("rect", (0, 0, 1, 1), 255)],
        "tent": [("poly", [(0, 1), (0.5, 0), (1, 1)], 255)],
        "star": [("poly", STAR, 255)],
        "ring": [("ellipse", (0, 0, 1, 1), 255), ("ellipse", (0.28, 0.28, 0.72, 0.72), 0)],
        "cross": [("rect", (0.35, 0, 0.65, 1), 255), ("rect", (0, 0.35, 1, 0.65), 255)],
        "diamond": [("poly", [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)], 255)],
        "moon": [("ellipse", (0, 0, 1, 1), 255), ("ellipse", (0.3, -0.1, 1.2, 0.9), 0)],
        "arrow": [("poly", ARROW_RIGHT, 255)],
        "house": [("rect", (0.1, 0.45, 0.9, 1), 255), ("poly", [(0, 0.5), (0.5, 0), (1, 0.5)], 255),
                  ("rect", (0.42, 0.7, 0.58, 1), 0)],
        "tree": [("rect", (0.4, 0.65, 0.6, 1), 255), ("poly", [(0.5, 0), (1, 0.72), (0, 0.72)], 255)],
        "cup": [("poly", [(0, 0), (0.75, 0), (0.65, 1), (0.1, 1)], 255), ("ellipse", (0.6, 0.2, 1, 0.65), 255),
                ("ellipse", (0.72, 0.32, 0.88, 0.53), 0)],
        "car": [("rect", (0, 0.4, 1, 0.8), 255), ("poly", [(0.15, 0.4), (0.3, 0.05), (0.7, 0.05), (0.85, 0.4)], 255),
                ("ellipse", (0.1, 0.6, 0.35, 1), 255), ("ellipse", (0.65, 0.6, 0.9, 1), 255)],
        "fish": [("ellipse", (0.2, 0.15, 1, 0.85), 255), ("poly", [(0, 0.1), (0.3, 0.5), (0, 0.9)], 255)],
        "flower": [("rect", (0.45, 0.5, 0.55, 1), 255)]
        + [("ellipse", (0.5 + 0.2 * np.cos(a) - 0.15, 0.35 + 0.2 * np.sin(a) - 0.15,
                        0.5 + 0.2 * np.cos(a) + 0.15, 0.35 + 0.2 * np.sin(a) + 0.15), 255)
           for a in np.linspace(0, 2 * np.pi, 6)[:-1]],
        "bottle": [("rect", (0.35, 0, 0.65, 0.3), 255), ("rect", (0, 0.25, 1, 1), 255)],
    }
    return ops[cls]


def _transform(facing: str) -> Callable[[float, float], tuple[float, float]]:
    if facing == "left":
        return lambda u, v: (1 - u, v)
    if facing == "up":
        return lambda u, v: (v, 1 - u)
    if facing == "down":
        return lambda u, v: (v, u)
    return lambda u, v: (u, v)


def shape_mask(cls: str, box: Sequence[float], facing: str, size: int) -> np.ndarray:
    """Boolean mask of one object instance; ``box`` is normalised (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (c * size for c in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    tf = _transform(facing)
    to_px = lambda u, v: (x0 + tf(u, v)[0] * w, y0 + tf(u, v)[1] * h)  # noqa: E731
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    for op, g, fill in _shape_ops(cls):
        if op == "poly":
            d.polygon([to_px(u, v) for u, v in g], fill=fill)
        else:
            (ax, ay), (bx, by) = to_px(g[0], g[1]), to_px(g[2], g[3])
            rect = [min(ax, bx), min(ay, by), max(ax, bx) - 1, max(ay, by) - 1]
            if rect[2] < rect[0] or rect[3] < rect[1]:
                continue
            (d.ellipse if op == "ellipse" else d.rectangle)(rect, fill=fill)
    return np.asarray(m) > 127


def texture_fill(colour: str, texture: str, box: Sequence[float], size: int) -> np.ndarray:
    """An SxSx3 fill: the named colour with a second tone laid out as the texture, shaded top-down."""
    c = np.asarray(COLOURS[colour], np.float32)
    alt = c * 0.45 if c.mean() > 90 else np.minimum(c + 110, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x0, y0, x1, y1 = (v * size for v in box)
    p = max(2.0, min(x1 - x0, y1 - y0) / 4)
    if texture == "striped":
        sel = ((xx - x0 + yy - y0) // p) % 2 == 1
    elif texture == "checkered":
        sel = (((xx - x0) // p + (yy - y0) // p) % 2) == 1
    elif texture == "dotted":
        sel = (((xx - x0) % p - p / 2) ** 2 + ((yy - y0) % p - p / 2) ** 2) < (p * 0.3) ** 2
    else:
        sel = np.zeros((size, size), bool)
    rgb = np.where(sel[..., None], alt, c)
    shade = 1.05 - 0.2 * np.clip((yy - y0) / max(y1 - y0, 1), 0, 1)
    return rgb * shade[..., None]


def paint_objects(cv: Canvas, objects: list[dict[str, Any]]) -> None:
    """Paint far to near (the spec's order), so overlap in the image is occlusion in the world."""
    for o in objects:
        m = shape_mask(o["class"], o["box"], o["facing"], cv.size)
        if m.any():
            cv.paint(m, texture_fill(o["colour"], o["texture"], o["box"], cv.size), SEG_ID[o["class"]], o["depth"])
