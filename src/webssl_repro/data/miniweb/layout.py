"""Resolution-free scene specs: what is in an image, before any pixel is drawn.

A spec is sampled once per (seed, index) in normalised [0, 1] coordinates and is itself the
JSON metadata, so the same image can be rendered at 32, 64, 224 px or at a larger size for
the OCR filter, and every render agrees with the metadata.

Scenes follow a simple pinhole world: an object at distance ``d`` (2-6 m) has apparent size
proportional to ``1/d`` and stands on a ground plane, so it sits higher in the frame the
farther it is; nearer objects are painted later and occlude farther ones.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from webssl_repro.data.miniweb.world import (
    BACKGROUNDS, CHART_LABEL_SETS, CHART_TABLE_DOC_KINDS, CHART_TITLES, COLOUR_NAMES, FORM_FIELDS,
    OBJECT_CLASSES, ORIENTED, PERSON_NAMES, TEXTURES, WORDS, MiniWebConfig, rng_for, sample_id,
)

HORIZON = 0.38  # fraction of the height where the ground plane meets the sky/wall
NEAR, FAR = 2.0, 6.0
ASPECT = {"car": 1.7, "fish": 1.6, "bottle": 0.45, "tree": 0.7, "cup": 0.85, "tent": 1.2, "house": 1.0}
CITIES = ("PARIS", "ROME", "OSLO", "LIMA", "CAIRO", "TOKYO", "DELHI", "QUITO")


def _r(x: float) -> float:
    return round(float(x), 4)


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over the smaller box: how much one box can hide the other."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _facing(rng: np.random.Generator, cls: str) -> str:
    if cls == "arrow":
        return str(rng.choice(("left", "right", "up", "down")))
    if cls in ORIENTED:
        return str(rng.choice(("left", "right")))
    return "none"


def _object(rng: np.random.Generator, cls: str, depth: float, size: float, cx: float, bottom: float) -> dict[str, Any]:
    facing = _facing(rng, cls)
    aspect = ASPECT.get(cls, 1.0)
    if cls == "arrow":
        aspect = 1.5 if facing in ("left", "right") else 0.67
    h = size if aspect <= 1 else size / aspect * 1.2
    w = min(h * aspect, 0.9)
    cx = float(np.clip(cx, w / 2, 1 - w / 2))
    bottom = float(np.clip(bottom, h, 1.0))
    return {
        "class": cls, "colour": str(rng.choice(COLOUR_NAMES)), "texture": str(rng.choice(TEXTURES)),
        "facing": facing, "depth": _r(depth),
        "box": [_r(cx - w / 2), _r(bottom - h), _r(cx + w / 2), _r(bottom)],
    }


def _scene_objects(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for _ in range(n):
        for _attempt in range(20):
            d = rng.uniform(NEAR, FAR)
            size = rng.uniform(0.35, 0.6) * NEAR / d
            bottom = HORIZON + (1 - HORIZON) * (NEAR / d) * 0.95 + rng.uniform(-0.03, 0.03)
            cand = _object(rng, str(rng.choice(OBJECT_CLASSES)), d, size, rng.uniform(0, 1), bottom)
            ok = all(_overlap(cand["box"], o["box"]) < 0.35 and abs(cand["depth"] - o["depth"]) > 0.25 for o in objects)
            if ok:
                objects.append(cand)
                break
    objects.sort(key=lambda o: -o["depth"])  # painter's order: far to near
    for i, o in enumerate(objects):
        o["occluded"] = any(_overlap(o["box"], p["box"]) > 0 for p in objects[i + 1:])
    return objects


def _contrasting(rng: np.random.Generator) -> tuple[str, str]:
    light = ("white", "yellow", "cyan", "pink")
    dark = ("black", "blue", "red", "purple", "brown", "green")
    a, b = str(rng.choice(light)), str(rng.choice(dark))
    return (a, b) if rng.random() < 0.5 else (b, a)


def _signs(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    signs: list[dict[str, Any]] = []
    for _ in range(n):
        for _attempt in range(20):
            word = str(rng.choice(WORDS))
            h = rng.uniform(0.17, 0.3)
            w = h * (0.72 * len(word) + 0.6)
            if w > 0.94:
                h, w = h * 0.94 / w, 0.94
            x0, y0 = rng.uniform(0.03, 0.97 - w), rng.uniform(0.03, 0.97 - h)
            box = [_r(x0), _r(y0), _r(x0 + w), _r(y0 + h)]
            if all(_overlap(box, s["box"]) == 0 for s in signs) and word not in {s["string"] for s in signs}:
                bg, fg = _contrasting(rng)
                signs.append({"string": word, "role": "sign", "box": box, "bg": bg, "fg": fg,
                              "depth": _r(rng.uniform(1.5, 1.95))})
                break
    return signs


def _background(rng: np.random.Generator, plain_only: bool = False) -> dict[str, Any]:
    style = str(rng.choice(("plain", "gradient", "noise") if plain_only else BACKGROUNDS))
    c1, c2 = (np.clip(rng.normal(150, 55, 3), 20, 235).astype(int).tolist() for _ in range(2))
    return {"style": style, "colours": [c1, c2], "period": _r(rng.uniform(0.05, 0.2))}


def _chart(rng: np.random.Generator) -> dict[str, Any]:
    ctype = str(rng.choice(("bar", "line", "pie")))
    labels = list(CHART_LABEL_SETS[rng.integers(len(CHART_LABEL_SETS))][: int(rng.integers(4, 7))])
    values = rng.integers(1, 21, len(labels)).tolist()
    return {"type": ctype, "title": str(rng.choice(CHART_TITLES)), "labels": labels, "values": values,
            "colour": str(rng.choice(("blue", "red", "green", "orange", "purple")))}


def _document(rng: np.random.Generator) -> dict[str, Any]:
    dtype = str(rng.choice(("paragraph", "table", "form")))
    doc: dict[str, Any] = {"type": dtype, "title": str(rng.choice(WORDS)).title()}
    if dtype == "paragraph":
        doc["lines"] = [" ".join(str(w).lower() for w in rng.choice(WORDS, int(rng.integers(3, 6))))
                        for _ in range(int(rng.integers(4, 8)))]
    elif dtype == "table":
        items = rng.choice(WORDS, int(rng.integers(3, 6)), replace=False)
        doc["header"] = ["Item", "Qty", "Price"]
        doc["rows"] = [[str(w).title(), str(int(rng.integers(1, 10))), str(int(rng.integers(2, 100)))] for w in items]
    else:
        fields = rng.choice(FORM_FIELDS, int(rng.integers(3, 6)), replace=False)
        values = {"Name": lambda: str(rng.choice(PERSON_NAMES)), "City": lambda: str(rng.choice(CITIES)),
                  "Item": lambda: str(rng.choice(WORDS)), "Code": lambda: str(int(rng.integers(100, 1000))),
                  "Total": lambda: str(int(rng.integers(10, 500))), "Date": lambda: f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}",
                  "Room": lambda: str(int(rng.integers(1, 60))), "Team": lambda: str(rng.choice(COLOUR_NAMES)).upper()}
        doc["fields"] = {str(f): values[str(f)]() for f in fields}
    return doc


def document_strings(doc: dict[str, Any]) -> list[str]:
    if doc["type"] == "paragraph":
        return [doc["title"], *doc["lines"]]
    if doc["type"] == "table":
        return [doc["title"], *doc["header"], *(c for row in doc["rows"] for c in row)]
    return [doc["title"], *(x for k, v in doc["fields"].items() for x in (f"{k}:", v))]


def chart_strings(chart: dict[str, Any]) -> list[str]:
    if chart["type"] == "pie":
        return [chart["title"], *(f"{l} {v}" for l, v in zip(chart["labels"], chart["values"]))]
    return [chart["title"], *chart["labels"], *(str(v) for v in chart["values"])]


def pick_kind(seed: int, index: int, cfg: MiniWebConfig) -> str:
    if cfg.source == "in1k":
        return "in1k"
    names, p = cfg.kind_probs()
    return str(rng_for(seed, index, "kind").choice(names, p=p))


def sample_spec(seed: int, index: int, cfg: MiniWebConfig | None = None, kind: str | None = None) -> dict[str, Any]:
    """The metadata of image ``(seed, index)``; ``kind`` forces a kind (eval sets need e.g. charts)."""
    from webssl_repro.data.miniweb.captions import caption

    cfg = cfg or MiniWebConfig()
    kind = kind or pick_kind(seed, index, cfg)
    rng = rng_for(seed, index, "spec:" + kind)
    spec: dict[str, Any] = {"id": sample_id(seed, index), "seed": int(seed), "index": int(index), "kind": kind,
                            "objects": [], "texts": [], "chart": None, "document": None}
    if kind in ("objects", "text_scene"):
        spec["background"] = _background(rng)
        hi = cfg.max_objects if kind == "objects" else max(cfg.min_objects, cfg.max_objects - 1)
        spec["objects"] = _scene_objects(rng, int(rng.integers(cfg.min_objects, hi + 1)))
        if kind == "text_scene":
            spec["texts"] = _signs(rng, int(rng.integers(1, cfg.max_signs + 1)))
    elif kind == "in1k":
        spec["background"] = _background(rng, plain_only=True)
        cls = OBJECT_CLASSES[index % len(OBJECT_CLASSES)] if cfg.source == "in1k" else str(rng.choice(OBJECT_CLASSES))
        size = rng.uniform(0.5, 0.75)
        obj = _object(rng, cls, NEAR, size, 0.5 + rng.uniform(-0.1, 0.1), 0.5 + size / 2 + rng.uniform(-0.08, 0.08))
        obj["occluded"] = False
        spec["objects"] = [obj]
        spec["label"] = OBJECT_CLASSES.index(cls)
    elif kind == "chart":
        spec["background"] = {"style": "plain", "colours": [[250, 250, 250], [250, 250, 250]], "period": 0.1}
        spec["chart"] = _chart(rng)
        spec["texts"] = [{"string": s, "role": "chart"} for s in chart_strings(spec["chart"])]
    elif kind == "document":
        spec["background"] = {"style": "plain", "colours": [[252, 252, 248], [252, 252, 248]], "period": 0.1}
        spec["document"] = _document(rng)
        spec["texts"] = [{"string": s, "role": "document"} for s in document_strings(spec["document"])]
    else:
        raise ValueError(f"sample_spec: unknown kind {kind!r}")
    spec["strings"] = [t["string"] for t in spec["texts"]]
    spec["has_text"] = bool(spec["strings"])
    spec["is_chart_table_doc"] = kind in CHART_TABLE_DOC_KINDS
    spec["caption"] = caption(spec, rng_for(seed, index, "caption"))
    return spec
