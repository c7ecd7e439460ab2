"""Text on pixels: fonts and the signs of text scenes.

Fonts are matplotlib's bundled DejaVu (always installed, no download). A sign's font is
as large as its plaque allows, so at 64 px the bigger signs are legible and the smaller
ones are not, as on the web.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from webssl_repro.data.miniweb.world import COLOURS, SEG_ID


@functools.lru_cache(maxsize=None)
def font(px: int, bold: bool = True) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), max(int(px), 4))


def fit_font(text: str, max_w: float, max_h: float, bold: bool = True) -> ImageFont.FreeTypeFont:
    """Largest font (to the pixel) whose rendering of ``text`` fits a max_w x max_h box."""
    px = max(int(max_h), 4)
    for _ in range(3):
        f = font(px, bold)
        length = f.getlength(text)
        if length <= max_w or px <= 4:
            return f
        px = max(4, int(px * max_w / length))
    return font(px, bold)


def draw_text(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, f: ImageFont.FreeTypeFont,
              fill: Any, anchor: str = "la") -> None:
    d.text(xy, text, font=f, fill=tuple(fill) if not isinstance(fill, str) else fill, anchor=anchor)


def paint_signs(cv: Any, signs: list[dict[str, Any]]) -> None:
    """Plaques with one word each, drawn nearest of all (signs are closer than any object)."""
    if not signs:
        return
    s = cv.size
    img = Image.fromarray(np.clip(cv.rgb, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for t in sorted(signs, key=lambda t: -t["depth"]):
        x0, y0, x1, y1 = (v * s for v in t["box"])
        rect = [round(x0), round(y0), max(round(x1) - 1, round(x0)), max(round(y1) - 1, round(y0))]
        bg, fg = np.asarray(COLOURS[t["bg"]]), COLOURS[t["fg"]]
        d.rectangle(rect, fill=tuple(int(v) for v in bg), outline=tuple(int(v) for v in bg * 0.6),
                    width=max(1, s // 96))
        f = fit_font(t["string"], (x1 - x0) * 0.86, (y1 - y0) * 0.72)
        draw_text(d, ((x0 + x1) / 2, (y0 + y1) / 2), t["string"], f, fg, anchor="mm")
        cv.seg[rect[1]:rect[3] + 1, rect[0]:rect[2] + 1] = SEG_ID["sign"]
        cv.depth[rect[1]:rect[3] + 1, rect[0]:rect[2] + 1] = t["depth"]
    cv.rgb[:] = np.asarray(img, np.float32)
