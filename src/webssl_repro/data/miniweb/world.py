"""The mini-web world: vocabularies, facts and the proportions of image kinds.

Everything the generator can draw, and every fact the VQA analogues may ask about, is
fixed here, so an evaluation set is a *view* of this world rather than a list of answers.
The default kind weights are set after the paper's measured shares of MC-2B: "contains
readable text" is a property of about half of the world (the paper: 50.3 %) and "chart, table
or document" of 2 % (the paper: 1.3 %). The light / heavy filters' kept shares on the mini-web
(Table 2's "% of data") therefore reflect this design, not a measurement of web data; no other
number of the paper is built into the world.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping

import numpy as np

OBJECT_CLASSES: tuple[str, ...] = (
    "ball", "box", "tent", "star", "ring", "cross", "diamond", "moon",
    "arrow", "house", "tree", "cup", "car", "fish", "flower", "bottle",
)
# Segmentation vocabulary: 0 is background; text carriers get their own ids.
SEG_CLASSES: tuple[str, ...] = ("background", *OBJECT_CLASSES, "sign", "chart", "document")
SEG_ID: dict[str, int] = {name: i for i, name in enumerate(SEG_CLASSES)}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (130, 50, 170), "pink": (240, 130, 180), "brown": (120, 75, 40),
    "white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
FACINGS: tuple[str, ...] = ("left", "right", "up", "down")
# Classes whose drawing has a direction (the MMVP-style fine-grained questions use them).
ORIENTED: frozenset[str] = frozenset({"arrow", "fish", "car"})
BACKGROUNDS: tuple[str, ...] = ("horizon", "plain", "gradient", "stripes", "noise")

# Words are short, upper-case and distinct so a legible sign has one right reading.
WORDS: tuple[str, ...] = (
    "OPEN", "SALE", "CAFE", "STOP", "EXIT", "HOTEL", "BANK", "PARK", "TAXI", "BOOKS",
    "PIZZA", "MUSIC", "SHOP", "BAKERY", "MARKET", "POST", "CLOSED", "PHONE", "FRUIT", "BREAD",
    "TOYS", "SHOES", "CINEMA", "GARDEN", "SCHOOL", "LIBRARY", "MUSEUM", "STATION", "BEACH", "RIVER",
    "NORTH", "SOUTH", "EAST", "WEST", "TRAIN", "PLANE", "SUSHI", "TEA", "JUICE", "FLOWERS",
    "DANCE", "GAMES", "STUDIO", "BIKES", "PHARMACY", "DENTIST", "BARBER", "PETS", "FISH", "LAMPS",
)
CHART_TITLES: tuple[str, ...] = (
    "Sales", "Visitors", "Rainfall", "Revenue", "Votes", "Downloads", "Orders", "Tickets",
    "Growth", "Energy", "Traffic", "Scores",
)
CHART_LABEL_SETS: tuple[tuple[str, ...], ...] = (
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat"),
    ("North", "South", "East", "West", "Central", "Coast"),
    ("Red", "Blue", "Green", "Gold", "Gray", "Pink"),
)
FORM_FIELDS: tuple[str, ...] = ("Name", "City", "Item", "Code", "Total", "Date", "Room", "Team")
PERSON_NAMES: tuple[str, ...] = ("ALICE", "BRUNO", "CLARA", "DAVID", "EMMA", "FELIX", "GRACE", "HUGO",
                                 "IRIS", "JONAS", "KATE", "LEON")

# Facts about object classes: the "knowledge" a VQA analogue may ask (ScienceQA/MMMU/AI2D-like).
KNOWLEDGE: dict[str, dict[str, Any]] = {
    "ball": {"category": "toy", "alive": False, "corners": 0, "floats": True},
    "box": {"category": "container", "alive": False, "corners": 4, "floats": True},
    "tent": {"category": "building", "alive": False, "corners": 3, "floats": False},
    "star": {"category": "symbol", "alive": False, "corners": 5, "floats": False},
    "ring": {"category": "toy", "alive": False, "corners": 0, "floats": True},
    "cross": {"category": "symbol", "alive": False, "corners": 12, "floats": False},
    "diamond": {"category": "symbol", "alive": False, "corners": 4, "floats": False},
    "moon": {"category": "symbol", "alive": False, "corners": 2, "floats": False},
    "arrow": {"category": "symbol", "alive": False, "corners": 7, "floats": False},
    "house": {"category": "building", "alive": False, "corners": 5, "floats": False},
    "tree": {"category": "plant", "alive": True, "corners": 0, "floats": True},
    "cup": {"category": "container", "alive": False, "corners": 4, "floats": True},
    "car": {"category": "vehicle", "alive": False, "corners": 4, "floats": False},
    "fish": {"category": "animal", "alive": True, "corners": 0, "floats": True},
    "flower": {"category": "plant", "alive": True, "corners": 0, "floats": True},
    "bottle": {"category": "container", "alive": False, "corners": 4, "floats": True},
}
CATEGORIES: tuple[str, ...] = tuple(sorted({f["category"] for f in KNOWLEDGE.values()}))

KINDS: tuple[str, ...] = ("objects", "text_scene", "chart", "document", "in1k")
CHART_TABLE_DOC_KINDS: frozenset[str] = frozenset({"chart", "document"})
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"objects": 0.50, "text_scene": 0.48, "chart": 0.01, "document": 0.01}


@dataclasses.dataclass(frozen=True)
class MiniWebConfig:
    """Knobs of the world; ``source="in1k"`` draws the curated class-balanced subset instead."""

    size: int = 64
    kinds: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    source: str = "web"
    min_objects: int = 1
    max_objects: int = 5
    max_signs: int = 3
    noise: float = 4.0  # std of per-pixel sensor noise (0-255 scale); web images are not clean renders

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"MiniWebConfig: unknown kind(s) {sorted(unknown)}; known {KINDS}")
        if not any(w > 0 for w in self.kinds.values()):
            raise ValueError(f"MiniWebConfig: kinds {dict(self.kinds)} gives no kind a weight above 0")
        if self.source not in ("web", "in1k"):
            raise ValueError(f"MiniWebConfig: source must be 'web' or 'in1k', got {self.source!r}")
        if self.size < 16:
            raise ValueError(f"MiniWebConfig: size must be >= 16 px, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("MiniWebConfig: need 1 <= min_objects <= max_objects")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MiniWebConfig":
        return cls(**dict(d or {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kinds"] = dict(self.kinds)
        return out

    def kind_probs(self) -> tuple[tuple[str, ...], np.ndarray]:
        names = tuple(k for k, w in self.kinds.items() if w > 0)
        w = np.array([self.kinds[k] for k in names], dtype=float)
        return names, w / w.sum()


def rng_for(seed: int, index: int, stream: str = "") -> np.random.Generator:
    """Independent stream per (seed, index, purpose): order- and worker-independent generation."""
    return np.random.default_rng([int(seed), int(index), zlib.crc32(stream.encode())])


def sample_id(seed: int, index: int) -> str:
    # No dots: webdataset splits keys at the first dot.
    return f"s{int(seed)}-{int(index):09d}"
