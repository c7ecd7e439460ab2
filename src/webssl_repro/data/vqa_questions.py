"""Question generators for the 16 VQA benchmark analogues, in the paper's four categories.

Each generator reads one scene spec (the world's ground truth) and asks what the real
benchmark asks of a real image: MME yes/no pairs, MMBench/SEED attribute multiple choice,
GQA relations, ScienceQA/MMMU/MathVista/AI2D facts from the world's knowledge table and
arithmetic, ChartQA chart values, OCRBench/TextVQA words on signs, DocVQA form fields,
MMVP direction pairs, RealWorldQA scene layout, CV-Bench counting/2-D relations and depth.
A generator returns [] when a scene cannot support its question (the caller draws the
next scene), so no answer is ever forced.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from webssl_repro.data.miniweb.world import CATEGORIES, COLOUR_NAMES, KNOWLEDGE, OBJECT_CLASSES, ORIENTED, TEXTURES

LETTERS = "ABCD"
Item = dict[str, Any]

# Which kind of image each benchmark analogue is asked about.
BENCHMARK_KINDS: dict[str, str] = {
    "mme": "objects", "mmbench": "objects", "seed": "objects", "gqa": "objects",
    "sqa": "objects", "mmmu": "objects", "mathvista": "objects", "ai2d": "in1k",
    "chartqa": "chart", "ocrbench": "text_scene", "textvqa": "text_scene", "docvqa": "document",
    "mmvp": "in1k", "realworldqa": "text_scene", "cvbench2d": "objects", "cvbench3d": "objects",
}


def _cx(o: dict[str, Any]) -> float:
    return (o["box"][0] + o["box"][2]) / 2


def _name(o: dict[str, Any], objects: list[dict[str, Any]]) -> str | None:
    """A description that picks out ``o`` alone: its class, else colour + class."""
    if sum(p["class"] == o["class"] for p in objects) == 1:
        return o["class"]
    if sum(p["class"] == o["class"] and p["colour"] == o["colour"] for p in objects) == 1:
        return f"{o['colour']} {o['class']}"
    return None


def _named(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    objs = spec["objects"]
    return [(n, o) for o in objs if (n := _name(o, objs)) is not None]


def _mc(rng: np.random.Generator, question: str, correct: str, pool: list[str] | tuple[str, ...], k: int = 4) -> Item:
    others = [p for p in dict.fromkeys(pool) if p != correct]
    picked = list(rng.choice(others, min(k - 1, len(others)), replace=False))
    choices = [correct, *map(str, picked)]
    rng.shuffle(choices)
    text = question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return {"question": text + "\nAnswer with the option's letter.", "answer": LETTERS[choices.index(correct)],
            "choices": choices, "answer_type": "mc"}


def _short(question: str, answer: Any, answer_type: str = "short") -> Item:
    return {"question": question + "\nAnswer with a single word or number.", "answer": str(answer),
            "choices": None, "answer_type": answer_type}


def _left_right_pair(rng: np.random.Generator, spec: dict[str, Any]) -> tuple[str, str, str] | None:
    named = _named(spec)
    pairs = [(a, b) for a in named for b in named if a is not b and abs(_cx(a[1]) - _cx(b[1])) > 0.12]
    if not pairs:
        return None
    (na, a), (nb, b) = pairs[int(rng.integers(len(pairs)))]
    return na, nb, "left" if _cx(a) < _cx(b) else "right"


def _depth_pair(rng: np.random.Generator, spec: dict[str, Any]) -> tuple[str, str, str] | None:
    named = _named(spec)
    pairs = [(a, b) for a in named for b in named if a is not b and abs(a[1]["depth"] - b[1]["depth"]) > 0.6]
    if not pairs:
        return None
    (na, a), (nb, b) = pairs[int(rng.integers(len(pairs)))]
    return na, nb, na if a["depth"] < b["depth"] else nb


# --- General -------------------------------------------------------------------------------
def q_mme(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    objs, named = spec["objects"], _named(spec)
    present = {o["class"] for o in objs}
    task = str(rng.choice(("existence", "count", "colour", "position")))
    if task == "existence":
        absent = [c for c in OBJECT_CLASSES if c not in present]
        qs = [(f"Is there a {rng.choice(sorted(present))} in this image?", "yes"),
              (f"Is there a {rng.choice(absent)} in this image?", "no")]
    elif task == "count":
        n = len(objs)
        wrong = int(rng.choice([m for m in range(1, 7) if m != n]))
        qs = [(f"Are there {n} objects in this image?", "yes"), (f"Are there {wrong} objects in this image?", "no")]
    elif task == "colour":
        if not named:
            return []
        name, o = named[int(rng.integers(len(named)))]
        taken = {p["colour"] for p in objs if p["class"] == o["class"]}
        other = str(rng.choice([c for c in COLOUR_NAMES if c not in taken]))
        qs = [(f"Is the {o['class']} {o['colour']}?" if name == o["class"] else f"Is there a {name}?", "yes"),
              (f"Is the {o['class']} {other}?" if name == o["class"] else f"Is there a {other} {o['class']}?", "no")]
    else:
        lr = _left_right_pair(rng, spec)
        if lr is None:
            return []
        na, nb, side = lr
        flip = "right" if side == "left" else "left"
        qs = [(f"Is the {na} to the {side} of the {nb}?", "yes"), (f"Is the {na} to the {flip} of the {nb}?", "no")]
    return [{"question": q + " Please answer yes or no.", "answer": a, "choices": None, "answer_type": "yesno",
             "subtask": task, "pair_id": f"{spec['id']}:{task}"} for q, a in qs]


def q_mmbench(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    named = _named(spec)
    if not named:
        return []
    name, o = named[int(rng.integers(len(named)))]
    if name != o["class"] or rng.random() < 0.5:
        return [dict(_mc(rng, f"What pattern does the {name} have?", o["texture"], TEXTURES), subtask="texture")]
    return [dict(_mc(rng, f"What colour is the {name}?", o["colour"], COLOUR_NAMES), subtask="colour")]


def q_seed(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    present = sorted({o["class"] for o in spec["objects"]})
    if rng.random() < 0.5:
        absent = [c for c in OBJECT_CLASSES if c not in present]
        correct = str(rng.choice(present))
        others = list(rng.choice(absent, 3, replace=False))
        return [dict(_mc(rng, "Which of these objects appears in the image?", correct, [correct, *others]),
                     subtask="presence")]
    n = len(spec["objects"])
    return [dict(_mc(rng, "How many objects are in the image?", str(n), [str(m) for m in range(1, 8)]), subtask="count")]


def q_gqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    if rng.random() < 0.5:
        lr = _left_right_pair(rng, spec)
        if lr is None:
            return []
        na, nb, side = lr
        return [dict(_short(f"Is the {na} to the left or to the right of the {nb}?", side), subtask="relation")]
    dp = _depth_pair(rng, spec)
    if dp is None:
        return []
    na, nb, nearer = dp
    other = nb if nearer == na else na
    named = dict(_named(spec))  # each name picks out one object
    o, behind = named[nearer], named[other]
    if sum(p["depth"] < behind["depth"] for p in spec["objects"]) != 1:
        return []  # any object nearer than the other is "in front of" it: only one may be
    return [dict(_short(f"What colour is the object in front of the {other}?", o["colour"]), subtask="attribute")]


# --- Knowledge -----------------------------------------------------------------------------
def _by_colour(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Objects the only one of their colour, named by it: a question that named the class would
    give its answer (a fixed fact of the class) away without the image."""
    objs = spec["objects"]
    return [o for o in objs if sum(p["colour"] == o["colour"] for p in objs) == 1]


def q_sqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    by_colour = _by_colour(spec)
    if not by_colour:
        return []
    o = by_colour[int(rng.integers(len(by_colour)))]
    fact = KNOWLEDGE[o["class"]]
    if rng.random() < 0.5:
        return [dict(_mc(rng, f"Is the {o['colour']} object in the image a living thing?",
                         "yes" if fact["alive"] else "no", ["yes", "no"], k=2), subtask="alive")]
    return [dict(_mc(rng, f"Would the {o['colour']} object in the image float on water?",
                     "yes" if fact["floats"] else "no", ["yes", "no"], k=2), subtask="floats")]


def q_mmmu(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    by_colour = _by_colour(spec)
    if not by_colour:
        return []
    o = by_colour[int(rng.integers(len(by_colour)))]
    return [dict(_mc(rng, f"To which category does the {o['colour']} object belong?",
                     KNOWLEDGE[o["class"]]["category"], CATEGORIES), subtask="category")]


def q_mathvista(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    objs = spec["objects"]
    if rng.random() < 0.5:
        k = int(rng.integers(1, 5))
        return [dict(_short(f"If {k} more objects were added, how many objects would there be?", len(objs) + k,
                            "number"), subtask="arithmetic")]
    with_corners = [o for o in _by_colour(spec) if KNOWLEDGE[o["class"]]["corners"] > 0]
    if not with_corners:
        return []
    o = with_corners[int(rng.integers(len(with_corners)))]
    return [dict(_short(f"How many corners does the {o['colour']} object have?", KNOWLEDGE[o["class"]]["corners"],
                        "number"), subtask="geometry")]


def q_ai2d(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    o = spec["objects"][0]
    if rng.random() < 0.5:
        return [dict(_mc(rng, "Which object does this diagram show?", o["class"], OBJECT_CLASSES), subtask="identify")]
    return [dict(_mc(rng, "What kind of thing does this diagram show?", KNOWLEDGE[o["class"]]["category"], CATEGORIES),
                 subtask="category")]


# --- OCR & Chart ---------------------------------------------------------------------------
def q_chartqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    c = spec["chart"]
    vals = c["values"]
    if rng.random() < 0.3 and vals.count(max(vals)) == 1:
        return [dict(_short("Which category has the highest value in the chart?", c["labels"][vals.index(max(vals))]),
                     subtask="argmax")]
    k = int(rng.integers(len(vals)))
    return [dict(_short(f"What is the value for {c['labels'][k]} in the chart?", vals[k], "number"), subtask="value")]


def _signs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in spec["texts"] if t["role"] == "sign"]


def q_ocrbench(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    signs = _signs(spec)
    if len(signs) == 1:
        return [dict(_short("What word is written in the image?", signs[0]["string"]), subtask="word")]
    unique = [s for s in signs if sum(t["bg"] == s["bg"] for t in signs) == 1]
    if not unique:
        return []
    s = unique[int(rng.integers(len(unique)))]
    return [dict(_short(f"What word is written on the {s['bg']} sign?", s["string"]), subtask="word")]


def q_textvqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    signs = _signs(spec)
    if len(signs) == 1:
        return [dict(_short("What does the sign say?", signs[0]["string"].lower()), subtask="scene_text")]
    xs = sorted(signs, key=lambda t: (t["box"][0] + t["box"][2]) / 2)
    ys = sorted(signs, key=lambda t: (t["box"][1] + t["box"][3]) / 2)
    opts = []
    if (xs[1]["box"][0] + xs[1]["box"][2]) / 2 - (xs[0]["box"][0] + xs[0]["box"][2]) / 2 > 0.15:
        opts.append(("leftmost", xs[0]))
    if (ys[1]["box"][1] + ys[1]["box"][3]) / 2 - (ys[0]["box"][1] + ys[0]["box"][3]) / 2 > 0.15:
        opts.append(("topmost", ys[0]))
    if not opts:
        return []
    where, s = opts[int(rng.integers(len(opts)))]
    return [dict(_short(f"What does the {where} sign say?", s["string"].lower()), subtask="scene_text")]


def q_docvqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    d = spec["document"]
    if d["type"] == "form":
        field = str(rng.choice(list(d["fields"])))
        return [dict(_short(f"What is written in the '{field}' field of the form?", d["fields"][field], "anls"),
                     subtask="form")]
    if d["type"] == "table":
        row = d["rows"][int(rng.integers(len(d["rows"])))]
        return [dict(_short(f"What is the price of {row[0]} in the table?", row[2], "anls"), subtask="table")]
    return [dict(_short("What is the title of the document?", d["title"], "anls"), subtask="title")]


# --- Vision-Centric ------------------------------------------------------------------------
_FLIP = {"left": "right", "right": "left", "up": "down", "down": "up"}


#: Oriented classes whose drawing shows the direction asked about: a car's is mirror-symmetric, so
#: a car facing left and one facing right are the same pixels (its facing stays in the corpus'
#: layout, which would otherwise change every scene after a car's)
SHOWS_FACING = ORIENTED - {"car"}


def q_mmvp(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    """Two images that differ only in the object's direction, with the same question (an MMVP pair)."""
    o = spec["objects"][0]
    if o["class"] not in SHOWS_FACING:
        return []
    twin = copy.deepcopy(spec)
    twin["objects"][0]["facing"] = _FLIP[o["facing"]]
    twin["id"] = spec["id"] + "-flip"
    verb = "point" if o["class"] == "arrow" else "face"
    pool = ["left", "right", "up", "down"] if o["class"] == "arrow" else ["left", "right"]
    items = []
    for s in (spec, twin):
        facing = s["objects"][0]["facing"]
        choices = sorted(pool)  # same options in the same order for both images of the pair
        text = f"Which direction does the {o['class']} {verb}?\n" + "\n".join(
            f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        items.append({"question": text + "\nAnswer with the option's letter.", "answer": LETTERS[choices.index(facing)],
                      "choices": choices, "answer_type": "mc", "subtask": "orientation", "pair_id": spec["id"],
                      "spec": s})
    return items


def q_realworldqa(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    named = _named(spec)
    if len(named) >= 2 and rng.random() < 0.5:
        nearest = min(named, key=lambda t: t[1]["depth"])
        if sorted(o["depth"] for _, o in named)[1] - nearest[1]["depth"] > 0.5:
            return [dict(_mc(rng, "Which object is closest to the camera?", nearest[0], [n for n, _ in named]),
                         subtask="nearest")]
    signs = _signs(spec)
    if not named or not signs:
        return []
    name, o = named[int(rng.integers(len(named)))]
    s = signs[0]
    dx = _cx(o) - (s["box"][0] + s["box"][2]) / 2
    if abs(dx) < 0.15:
        return []
    return [dict(_mc(rng, f"Is the {name} to the left or to the right of the '{s['string']}' sign?",
                     "left" if dx < 0 else "right", ["left", "right"], k=2), subtask="layout")]


def q_cvbench2d(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    if rng.random() < 0.5:
        n = len(spec["objects"])
        return [dict(_mc(rng, "How many objects are in the image?", str(n), [str(m) for m in range(0, 7)]),
                     subtask="count")]
    lr = _left_right_pair(rng, spec)
    if lr is None:
        return []
    na, nb, side = lr
    return [dict(_mc(rng, f"Where is the {na} located with respect to the {nb}?", side, ["left", "right"], k=2),
                 subtask="relation")]


def q_cvbench3d(spec: dict[str, Any], rng: np.random.Generator) -> list[Item]:
    if rng.random() < 0.5:
        dp = _depth_pair(rng, spec)
        if dp is None:
            return []
        na, nb, nearer = dp
        return [dict(_mc(rng, f"Which object is closer to the camera, the {na} or the {nb}?", nearer, [na, nb], k=2),
                     subtask="depth")]
    named = _named(spec)
    if len(named) < 3:
        return []
    ref_i = int(rng.integers(len(named)))
    ref = named[ref_i]
    (na, a), (nb, b) = [named[i] for i in rng.choice([i for i in range(len(named)) if i != ref_i], 2, replace=False)]

    def dist(o: dict[str, Any]) -> float:  # 3-D distance on the ground plane: lateral offset grows with depth
        return float(np.hypot((_cx(o) - 0.5) * o["depth"] - (_cx(ref[1]) - 0.5) * ref[1]["depth"],
                              o["depth"] - ref[1]["depth"]))

    if abs(dist(a) - dist(b)) < 0.5:
        return []
    closer = na if dist(a) < dist(b) else nb
    return [dict(_mc(rng, f"Which object is closer to the {ref[0]}, the {na} or the {nb}?", closer, [na, nb], k=2),
                 subtask="distance")]


GENERATORS: dict[str, Callable[[dict[str, Any], np.random.Generator], list[Item]]] = {
    "mme": q_mme, "mmbench": q_mmbench, "seed": q_seed, "gqa": q_gqa,
    "sqa": q_sqa, "mmmu": q_mmmu, "mathvista": q_mathvista, "ai2d": q_ai2d,
    "chartqa": q_chartqa, "ocrbench": q_ocrbench, "textvqa": q_textvqa, "docvqa": q_docvqa,
    "mmvp": q_mmvp, "realworldqa": q_realworldqa, "cvbench2d": q_cvbench2d, "cvbench3d": q_cvbench3d,
}
