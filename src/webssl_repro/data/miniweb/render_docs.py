"""Documents: paragraphs, tables and forms on a page, the DocVQA side of the world."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from webssl_repro.data.miniweb.render_text import draw_text, fit_font, font
from webssl_repro.data.miniweb.world import SEG_ID


def paint_document(cv: Any, doc: dict[str, Any]) -> None:
    s = cv.size
    img = Image.new("RGB", (s, s), (252, 252, 248))
    d = ImageDraw.Draw(img)
    ink, grey = (20, 20, 20), (120, 120, 120)
    draw_text(d, (s * 0.06, s * 0.04), doc["title"], fit_font(doc["title"], s * 0.88, s * 0.11), ink)
    body = font(s * 0.062, bold=False)
    if doc["type"] == "paragraph":
        for k, line in enumerate(doc["lines"]):
            draw_text(d, (s * 0.06, s * (0.2 + 0.105 * k)), line, fit_font(line, s * 0.88, s * 0.062, bold=False), ink)
    elif doc["type"] == "table":
        rows = [doc["header"], *doc["rows"]]
        top, rh = s * 0.2, s * 0.13
        cols = [s * 0.05, s * 0.5, s * 0.72, s * 0.95]
        for r, row in enumerate(rows):
            y = top + r * rh
            d.line([(cols[0], y), (cols[-1], y)], fill=grey, width=1)
            for c, cell in enumerate(row):
                f = font(s * 0.062, bold=(r == 0))
                draw_text(d, (cols[c] + s * 0.02, y + rh / 2), cell, f, ink, anchor="lm")
        bottom = top + len(rows) * rh
        d.line([(cols[0], bottom), (cols[-1], bottom)], fill=grey, width=1)
        for x in cols:
            d.line([(x, top), (x, bottom)], fill=grey, width=1)
    else:
        for k, (field, value) in enumerate(doc["fields"].items()):
            y = s * (0.22 + 0.15 * k)
            draw_text(d, (s * 0.06, y), f"{field}:", body, ink)
            d.rectangle([s * 0.4, y - s * 0.02, s * 0.95, y + s * 0.1], outline=grey, width=1)
            draw_text(d, (s * 0.43, y), value, body, ink)
    cv.rgb[:] = np.asarray(img, np.float32)
    cv.seg[:] = SEG_ID["document"]
    cv.depth[:] = 1.0
