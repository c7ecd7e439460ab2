"""One-sentence captions from a spec: the text side of the alignment and CLIP analogues.

Captions are written from the metadata only (never from pixels), with a few templates so
that a caption is a description, not a fixed code for the spec.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def describe_object(o: dict[str, Any]) -> str:
    tex = "" if o["texture"] == "solid" else o["texture"] + " "
    return f"{o['colour']} {tex}{o['class']}"


def _scene(objects: list[dict[str, Any]], rng: np.random.Generator) -> str:
    near = sorted(objects, key=lambda o: o["depth"])
    parts = [f"a {describe_object(o)}" for o in near]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    lead = str(rng.choice(("a photo of", "a picture showing", "an image of", "a scene with")))
    sentence = f"{lead} {body}"
    if len(near) >= 2 and rng.random() < 0.6:
        sentence += f", the {near[0]['class']} in front of the {near[-1]['class']}"
    return sentence


def caption(spec: dict[str, Any], rng: np.random.Generator) -> str:
    kind = spec["kind"]
    if kind == "objects":
        return _scene(spec["objects"], rng) + "."
    if kind == "text_scene":
        words = [t["string"] for t in spec["texts"]]
        signs = " and ".join(f"'{w}'" for w in words)
        noun = "a sign that reads" if len(words) == 1 else f"{_NUM.get(len(words), len(words))} signs reading"
        return f"{_scene(spec['objects'], rng)} with {noun} {signs}."
    if kind == "in1k":
        o = spec["objects"][0]
        return f"{rng.choice(('a close-up photo of', 'a photo of', 'a centred picture of'))} a {describe_object(o)}."
    if kind == "chart":
        c = spec["chart"]
        return f"a {c['type']} chart titled '{c['title']}' comparing {', '.join(c['labels'][:-1])} and {c['labels'][-1]}."
    d = spec["document"]
    if d["type"] == "form":
        return f"a form titled '{d['title']}' with fields {', '.join(d['fields'])}."
    if d["type"] == "table":
        return f"a document with a table of {len(d['rows'])} items titled '{d['title']}'."
    return f"a text document titled '{d['title']}' with {len(d['lines'])} lines of text."
