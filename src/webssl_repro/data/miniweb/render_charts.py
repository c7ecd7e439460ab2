"""Bar, line and pie charts drawn with PIL (matplotlib is ~100x slower per image).

Layout is proportional to the image size: a title on top, values printed at the marks
and category labels under the axis, as in typical web infographics.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from webssl_repro.data.miniweb.render_text import draw_text, fit_font, font
from webssl_repro.data.miniweb.world import COLOURS, SEG_ID

PIE_COLOURS = ("blue", "orange", "green", "red", "purple", "cyan")


def paint_chart(cv: Any, chart: dict[str, Any]) -> None:
    s = cv.size
    img = Image.new("RGB", (s, s), (250, 250, 250))
    d = ImageDraw.Draw(img)
    ink = (30, 30, 30)
    draw_text(d, (s / 2, s * 0.02), chart["title"], fit_font(chart["title"], s * 0.9, s * 0.12), ink, anchor="mt")
    labels, values = chart["labels"], chart["values"]
    n, vmax = len(labels), max(chart["values"])
    small = font(s * 0.065, bold=False)
    if chart["type"] == "pie":
        box = [s * 0.04, s * 0.22, s * 0.5, s * 0.68]
        start = -90.0
        for k, v in enumerate(values):
            end = start + 360.0 * v / sum(values)
            d.pieslice(box, start, end, fill=COLOURS[PIE_COLOURS[k % len(PIE_COLOURS)]], outline=(255, 255, 255))
            start = end
        for k, (lab, v) in enumerate(zip(labels, values)):
            y = s * (0.2 + k * 0.12)
            d.rectangle([s * 0.55, y + s * 0.01, s * 0.6, y + s * 0.06], fill=COLOURS[PIE_COLOURS[k % len(PIE_COLOURS)]])
            draw_text(d, (s * 0.62, y), f"{lab} {v}", small, ink)
    else:
        left, right, top, bottom = s * 0.08, s * 0.97, s * 0.24, s * 0.84
        d.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=max(1, s // 128))
        step = (right - left) / n
        xs = [left + step * (k + 0.5) for k in range(n)]
        ys = [bottom - (bottom - top) * v / vmax for v in values]
        colour = COLOURS[chart["colour"]]
        if chart["type"] == "bar":
            for x, y in zip(xs, ys):
                d.rectangle([x - step * 0.32, y, x + step * 0.32, bottom - 1], fill=colour)
        else:
            d.line(list(zip(xs, ys)), fill=colour, width=max(1, s // 64))
            r = max(1.0, s / 80)
            for x, y in zip(xs, ys):
                d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        for x, y, lab, v in zip(xs, ys, labels, values):
            draw_text(d, (x, y - s * 0.01), str(v), small, ink, anchor="md")
            draw_text(d, (x, bottom + s * 0.02), lab, fit_font(lab, step * 0.95, s * 0.065, bold=False), ink, anchor="mt")
    cv.rgb[:] = np.asarray(img, np.float32)
    cv.seg[:] = SEG_ID["chart"]
    cv.depth[:] = 1.0
