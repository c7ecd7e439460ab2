"""Run names <-> fields.

A run name mirrors the released checkpoint ids (``facebook/webssl-dino7b-full8b-518``):
``{method}{size}-{data}{samples}-{res}``. ImageNet-1k runs carry an epoch budget from
the config instead of a samples label and are named ``{method}{size}-in1k-{res}``.
The labels are the paper's vocabulary; the config maps them to numbers per scale.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

METHODS = ("dino", "mae", "clip")
SIZES = ("300m", "700m", "1b", "2b", "3b", "5b", "7b")
DATA = ("full", "light", "heavy", "in1k")
SAMPLES = ("1b", "2b", "4b", "8b")
RESOLUTIONS = ("224", "378", "518")

_NAME = re.compile(
    r"^(?P<method>{m})(?P<size>{s})-(?:(?P<data>{d})(?P<samples>{n})|(?P<in1k>in1k))-(?P<res>{r})$".format(
        m="|".join(METHODS),
        s="|".join(SIZES),
        d="|".join(x for x in DATA if x != "in1k"),
        n="|".join(SAMPLES),
        r="|".join(RESOLUTIONS),
    )
)


def _order(values: tuple[str, ...], value: Optional[str]) -> int:
    return -1 if value is None else values.index(value)


@dataclass(frozen=True)
class Run:
    method: str
    size: str
    data: str
    samples: Optional[str]
    res: int

    def __post_init__(self) -> None:
        for field, allowed, value in (
            ("method", METHODS, self.method),
            ("size", SIZES, self.size),
            ("data", DATA, self.data),
        ):
            if value not in allowed:
                raise ValueError(f"run field {field}={value!r} is not one of {allowed}")
        if str(self.res) not in RESOLUTIONS:
            raise ValueError(f"run field res={self.res!r} is not one of {RESOLUTIONS}")
        if self.data == "in1k":
            if self.samples is not None:
                raise ValueError("in1k runs are budgeted in epochs (config), not samples: samples must be None")
        elif self.samples not in SAMPLES:
            raise ValueError(f"run field samples={self.samples!r} is not one of {SAMPLES}")

    @classmethod
    def parse(cls, name: str) -> "Run":
        m = _NAME.match(name)
        if m is None:
            raise ValueError(
                f"not a run name: {name!r} (expected {{method}}{{size}}-{{data}}{{samples}}-{{res}}, "
                "e.g. 'dino7b-full8b-518' or 'dino1b-in1k-224')"
            )
        if m["in1k"]:
            return cls(m["method"], m["size"], "in1k", None, int(m["res"]))
        return cls(m["method"], m["size"], m["data"], m["samples"], int(m["res"]))

    def __str__(self) -> str:
        data = "in1k" if self.data == "in1k" else f"{self.data}{self.samples}"
        return f"{self.method}{self.size}-{data}-{self.res}"

    @property
    def name(self) -> str:
        return str(self)

    @property
    def parent(self) -> Optional["Run"]:
        """The run a high-resolution fine-tune starts from (paper App. C), else None."""
        if self.res == 224:
            return None
        return Run(self.method, self.size, self.data, self.samples, 224)

    def sort_key(self) -> tuple:
        return (
            METHODS.index(self.method),
            SIZES.index(self.size),
            DATA.index(self.data),
            _order(SAMPLES, self.samples),
            self.res,
        )

    def replace(self, **fields) -> "Run":
        values = dict(method=self.method, size=self.size, data=self.data, samples=self.samples, res=self.res)
        values.update(fields)
        return Run(**values)


_SEED = re.compile(r"^(?P<run>.+)\.s(?P<seed>[0-9]+)$")


def with_seed(run: str, seed: int, first_seed: int = 0) -> str:
    """The directory name of one seed of a run: the plain name for the first seed, ``{run}.s{seed}`` else."""
    return run if seed == first_seed else f"{run}.s{seed}"


def split_seed(run_id: str, first_seed: int = 0) -> tuple[str, int]:
    m = _SEED.match(run_id)
    return (m["run"], int(m["seed"])) if m else (run_id, first_seed)


def is_run_name(name: str) -> bool:
    return _NAME.match(name) is not None


def sort_runs(names) -> list[str]:
    """Runs in the grid's order, then any off-the-shelf encoder imported as a run (``dinov2-g-224``) by name."""
    names = set(names)
    runs = sorted((Run.parse(n) for n in names if is_run_name(n)), key=Run.sort_key)
    return [*map(str, runs), *sorted(n for n in names if not is_run_name(n))]


def _listed(values, spec: str = "") -> str:
    """One value where all are the same, else all of them."""
    values = [format(v, spec) if isinstance(v, int) else str(v) for v in values]
    return values[0] if len(set(values)) == 1 else ", ".join(values)


def label_legend(labels: dict, scale: str) -> str:
    """What the paper's labels stand for at ``scale`` (``config.labels``): a table or figure prints
    the paper's ``ViT-7B`` or ``8B seen`` at every scale, and at a small one says what they are."""
    parts = []
    sizes = {k: v for k, v in labels.get("sizes", {}).items() if k in SIZES}
    if sizes:
        shape = {key: _listed(v.get(key, "?") for v in sizes.values()) for key in ("width", "depth", "patch")}
        parts.append(f"ViT-{', '.join(k.upper() for k in sizes)} are towers of width {shape['width']}, depth "
                     f"{shape['depth']} and patch {shape['patch']}")
    samples = labels.get("samples", {})
    if samples:
        counts = _listed((int(v) for v in samples.values()), ",")
        parts.append(f"{', '.join(k.upper() for k in samples)} seen are {counts} samples")
    resolutions = labels.get("resolutions", {})
    if resolutions:
        parts.append(f"{', '.join(map(str, resolutions))} px are {_listed(resolutions.values())} px")
    if "in1k_images" in labels and "in1k_epochs" in labels:
        parts.append(f"ImageNet-1k is {int(labels['in1k_images']):,} images for {labels['in1k_epochs']} epochs")
    if not parts:
        return ""
    return f"What the paper's labels stand for at {scale} (config labels): " + "; ".join(parts) + "."
