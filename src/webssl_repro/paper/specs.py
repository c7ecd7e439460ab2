"""Every table and figure of the paper as data: which runs, which metrics, which axes.

This is the one source of truth for the experiment grid: the set of runs the DAG
trains is the union of the runs the requested items need (``workflow.Plan.grid_runs``).
A row or series point names either a run (``dino7b-full8b-518``) or an off-the-shelf
baseline id (``siglip-so400m-384``); baselines are never trained here: they are drawn from the
paper's numbers where it prints them, or evaluated where a config imports them
(``pretrain.run_sources``, ``releases.OFF_THE_SHELF``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from webssl_repro.metrics import (
    CATEGORY_COLUMNS,
    CLASSIC_METRICS,
    DATA_PCT,
    VQA_BENCHMARKS,
)
from webssl_repro.runs import is_run_name

BASELINES: dict[str, str] = {
    "metaclip-h-224": "MetaCLIP ViT-H",
    "metaclip-g-224": "MetaCLIP ViT-G",
    "siglip-so400m-224": "SigLIP ViT-SO400M",
    "siglip-so400m-384": "SigLIP ViT-SO400M",
    "siglip2-so400m-224": "SigLIP2 ViT-SO400M",
    "siglip2-so400m-384": "SigLIP2 ViT-SO400M",
    "dinov2-g-224": "DINOv2 ViT-g",
    "dinov2-g-378": "DINOv2 ViT-g",
    "dinov2-g-518": "DINOv2 ViT-g",
    "ijepa-h-224": "I-JEPA ViT-H",
    "mae-h-224": "MAE ViT-H",
}

SIZES_2B = ("1b", "2b", "3b", "5b", "7b")
PARAMS_B = {"300m": 0.3, "1b": 1.0, "2b": 2.0, "3b": 3.0, "5b": 5.0, "7b": 7.0}
SAMPLES_B = {"1b": 1.0, "2b": 2.0, "4b": 4.0, "8b": 8.0}
VQA_PANELS = CATEGORY_COLUMNS  # Average + the four categories, in the paper's panel order

# Which eval file provides a metric.
EVAL_OF_METRIC = {
    **{m: "vqa" for m in (*VQA_BENCHMARKS, *CATEGORY_COLUMNS)},
    **{m: "classic" for m in CLASSIC_METRICS},
    DATA_PCT: "filter",
}


@dataclass(frozen=True)
class Row:
    label: str
    source: str  # run name or baseline id


@dataclass(frozen=True)
class Series:
    label: str
    sources: tuple[str, ...]
    x: tuple[float, ...]
    color: str = "C0"
    marker: str = "o"


@dataclass(frozen=True)
class Item:
    """A table or a figure. ``published`` lists the paper tables its numbers come from."""

    id: str
    title: str
    kind: str  # "table" | "lines" | "bars"
    published: tuple[str, ...]
    metrics: tuple[str, ...]
    rows: tuple[Row, ...] = ()
    series: tuple[Series, ...] = ()
    xlabel: str = ""
    xticks: tuple[tuple[float, str], ...] = ()
    references: tuple[Row, ...] = field(default=())  # horizontal reference lines (figures)
    note: str = ""
    # Tables: descriptive columns read from the published table's metadata (Table 3's group,
    # data, samples seen, resolution), and the row whose values later rows print deltas
    # against (Table 2's Light / Heavy vs the unfiltered Web-DINO).
    descriptors: tuple[str, ...] = ()
    delta_from: str = ""
    run_note: str = ""  # a footnote at the run scales only
    paper_note: str = ""  # one at the published scale only
    # Figures: label each series with its gain from its first to its last plotted point (Fig. 1's
    # annotations); the note, which says how, is then always shown (else only beside a gap).
    gains: bool = False

    @property
    def overlay(self) -> bool:
        """Whether a run scale draws it over the paper's: only line figures share axes with the
        paper's; Fig. 9's alignment values are not printed."""
        return self.kind == "lines"

    def scale_notes(self, scale: str, legend: str = "", has_runs: bool = False) -> list[str]:
        """The notes that depend on the scale, for tables and figures alike: ``run_note`` and, under
        numbers of runs, ``legend`` (``runs.label_legend``) at a run scale; ``paper_note`` at the
        published one."""
        if scale == "published":
            return [self.paper_note] if self.paper_note else []
        return [n for n in (self.run_note, legend if has_runs else "") if n]

    @property
    def sources(self) -> tuple[str, ...]:
        out: list[str] = [r.source for r in self.rows]
        for s in self.series:
            out.extend(s.sources)
        out.extend(r.source for r in self.references)
        return tuple(dict.fromkeys(out))

    @property
    def runs(self) -> tuple[str, ...]:
        return tuple(s for s in self.sources if is_run_name(s))

    @property
    def baselines(self) -> tuple[str, ...]:
        """The off-the-shelf encoders among the sources (``BASELINES``)."""
        return tuple(s for s in self.sources if s in BASELINES)

    @property
    def evals(self) -> tuple[str, ...]:
        if self.kind == "bars":
            return ("alignment",)
        return tuple(dict.fromkeys(EVAL_OF_METRIC[m] for m in self.metrics))


def _size_rows(method_label: str, method: str, data: str, sizes=SIZES_2B) -> tuple[Row, ...]:
    return tuple(Row(f"{method_label} ViT-{s.upper()}", f"{method}{s}-{data}-224") for s in sizes)


def _size_series(label: str, method: str, data: str, sizes, color: str, marker: str = "o") -> Series:
    return Series(label, tuple(f"{method}{s}-{data}-224" for s in sizes), tuple(PARAMS_B[s] for s in sizes), color, marker)


def _samples_series(label: str, method: str, color: str) -> Series:
    samples = ("1b", "2b", "4b", "8b")
    return Series(label, tuple(f"{method}7b-full{n}-224" for n in samples), tuple(SAMPLES_B[n] for n in samples), color)


_SIZE_TICKS = tuple((PARAMS_B[s], s.upper()) for s in SIZES_2B)
_SAMPLE_TICKS = tuple((v, k.upper()) for k, v in SAMPLES_B.items())
_VQA_TABLE = (*VQA_BENCHMARKS, "Average")
_OCR = ("chartqa", "ocrbench", "textvqa", "docvqa")

ITEMS: dict[str, Item] = {}


def _add(item: Item) -> None:
    ITEMS[item.id] = item


_add(Item(
    "table2", "Impact of text filtering: Web-DINO ViT-2B (2B seen) vs CLIP ViT-2B", "table", ("table2",),
    (DATA_PCT, "Average", "General", "Knowledge", "Vision-Centric", "OCR & Chart", *_OCR),
    rows=(
        Row("CLIP ViT-2B", "clip2b-full2b-224"),
        Row("Web-DINO ViT-2B", "dino2b-full2b-224"),
        Row("Web-DINO ViT-2B (Light)", "dino2b-light2b-224"),
        Row("Web-DINO ViT-2B (Heavy)", "dino2b-heavy2b-224"),
    ),
    delta_from="dino2b-full2b-224",
    run_note="% of data: the share of this scale's corpus each filter kept. The mini-web's mix of image kinds is "
             "set after the paper's shares (data/miniweb/world.py), so there it reflects that design, not web data.",
))
_add(Item(
    "table3", "Comparison with other vision models (VQA categories and classic vision)", "table", ("table3",),
    (*CATEGORY_COLUMNS, *CLASSIC_METRICS),
    rows=(
        *(Row(BASELINES[s], s) for s in ("siglip-so400m-224", "siglip-so400m-384", "siglip2-so400m-224",
                                         "siglip2-so400m-384", "metaclip-g-224", "mae-h-224", "ijepa-h-224",
                                         "dinov2-g-518")),
        *(Row("Web-DINO ViT-7B", f"dino7b-full8b-{r}") for r in (224, 378, 518)),
    ),
    descriptors=("group", "pretrain_data", "samples_seen", "res"),
    note="The paper's I-JEPA ViT-H row (OCR & Chart 21.2, Average 44.7) disagrees with its Table 14 sub-scores "
         "(OCR & Chart 19.43, Average 44.30; Table 14 prints 44.78). MetaCLIP here is ViT-G (12.8B seen), not "
         "Table 14's ViT-H.",
))
_add(Item("table6", "VQA: Web-DINO ViT-1B…7B, MC-2B, 2B seen", "table", ("table6",), _VQA_TABLE,
          rows=_size_rows("Web-DINO", "dino", "full2b")))
_add(Item("table7", "Classic vision: Web-DINO ViT-1B…7B, 2B seen", "table", ("table7",), CLASSIC_METRICS,
          rows=_size_rows("Web-DINO", "dino", "full2b")))
_add(Item("table8", "VQA: Web-DINO ViT-7B, 1B…8B samples seen", "table", ("table8",), _VQA_TABLE,
          rows=tuple(Row(f"Web-DINO ViT-7B {n.upper()} seen", f"dino7b-full{n}-224") for n in SAMPLES_B)))
_add(Item("table9", "Classic vision: Web-DINO ViT-7B, 2B/4B/8B samples seen", "table", ("table9",), CLASSIC_METRICS,
          rows=tuple(Row(f"Web-DINO ViT-7B {n.upper()} seen", f"dino7b-full{n}-224") for n in ("2b", "4b", "8b"))))
#: The legends' ">1B / <1B data" are the paper's corpora; a run scale's two may be of one size.
_DATA_REGIMES = ("At this scale the labels name the config's own corpora and budgets: its web corpus and its "
                 "ImageNet-1k analogue may hold as many images, and their runs see as many samples "
                 "(config labels, data), so the two differ in content, not in size.")
_add(Item("table10", "VQA: Web-DINO trained on ImageNet-1k", "table", ("table10",), _VQA_TABLE,
          rows=tuple(Row(f"Web-DINO ViT-{s.upper()} (IN-1k)", f"dino{s}-in1k-224") for s in ("1b", "2b", "3b", "5b")),
          run_note=_DATA_REGIMES))
_add(Item("table11", "VQA: Web-MAE ViT-1B…5B, MC-2B", "table", ("table11",), _VQA_TABLE,
          rows=_size_rows("Web-MAE", "mae", "full2b", ("1b", "2b", "3b", "5b"))))
_add(Item("table12", "VQA: CLIP ViT-1B…7B trained on MC-2B (MetaCLIP recipe)", "table", ("table12",), _VQA_TABLE,
          rows=_size_rows("CLIP", "clip", "full2b")))
_add(Item("table13", "VQA: Web-DINO 1B and 2B with no / light / heavy text filter", "table", ("table13",), _VQA_TABLE,
          rows=tuple(Row(f"Web-DINO ViT-{s.upper()} {lab}", f"dino{s}-{d}2b-224")
                     for s in ("1b", "2b") for d, lab in (("full", "no filter"), ("light", "Light"), ("heavy", "Heavy")))))
_add(Item("table14", "VQA: off-the-shelf vision encoders", "table", ("table14",), _VQA_TABLE,
          rows=tuple(Row(f"{BASELINES[b]} {b.rsplit('-', 1)[1]}", b) for b in (
              "metaclip-h-224", "siglip-so400m-224", "siglip-so400m-384", "siglip2-so400m-224", "siglip2-so400m-384",
              "dinov2-g-224", "dinov2-g-378", "dinov2-g-518", "ijepa-h-224", "mae-h-224")),
          note="The paper's I-JEPA ViT-H sub-scores average to 44.30, not its printed 44.78 (one OCR score is "
               "probably mistyped). MetaCLIP here is ViT-H, not Table 3's ViT-G."))
_add(Item("table15", "VQA: Web-DINO ViT-7B (8B seen) at 224 / 378 / 518 px", "table", ("table15",), _VQA_TABLE,
          rows=tuple(Row(f"Web-DINO ViT-7B {r}", f"dino7b-full8b-{r}") for r in (224, 378, 518))))

_add(Item(
    "fig1", "Scaling visual SSL vs CLIP: average VQA vs model size under different data regimes", "lines",
    ("table6", "table12", "table10", "table14"), ("Average",),
    series=(
        _size_series("Web-SSL (MC-2B, >1B data)", "dino", "full2b", SIZES_2B, "C3"),
        _size_series("CLIP (MC-2B, >1B data)", "clip", "full2b", SIZES_2B, "C0", "s"),
        _size_series("Web-DINO (ImageNet-1k, <1B data)", "dino", "in1k", ("1b", "2b", "3b", "5b"), "C7", "^"),
        Series("DINOv2 ViT-g (LVD-142M, <1B data)", ("dinov2-g-224",), (1.1,), "C2", "D"),
    ),
    xlabel="Model size (params)", xticks=_SIZE_TICKS, gains=True,
    note="Annotations: each series' gain from its first to its last plotted size, from the plotted values.",
    paper_note="The paper prints +4.6 for Web-SSL: 53.87 - 49.25, from DINOv2 ViT-g, not Web-DINO 1B (+4.86).",
    run_note=_DATA_REGIMES,
))
_add(Item("fig3", "Scaling model size: Web-DINO vs CLIP on MC-2B (2B seen, 224 px)", "lines", ("table6", "table12"),
          VQA_PANELS, series=(_size_series("Web-DINO", "dino", "full2b", SIZES_2B, "C3"),
                              _size_series("CLIP", "clip", "full2b", SIZES_2B, "C0", "s")),
          xlabel="Model size (params)", xticks=_SIZE_TICKS))
_add(Item("fig4", "Scaling samples seen: ViT-7B Web-DINO and CLIP", "lines", ("table8", "table12"), VQA_PANELS,
          series=(_samples_series("Web-DINO ViT-7B", "dino", "C3"), _samples_series("CLIP ViT-7B", "clip", "C0")),
          xlabel="Samples seen", xticks=_SAMPLE_TICKS,
          note="The paper plots CLIP ViT-7B at 1B/4B/8B seen but prints no numbers for them."))
_add(Item("fig5", "Web-MAE vs Web-DINO on MC-2B", "lines", ("table6", "table11"), VQA_PANELS,
          series=(_size_series("Web-DINO", "dino", "full2b", ("1b", "2b", "3b", "5b"), "C3"),
                  _size_series("Web-MAE", "mae", "full2b", ("1b", "2b", "3b", "5b"), "C1", "s")),
          xlabel="Model size (params)", xticks=_SIZE_TICKS[:4]))
_add(Item("fig6", "ImageNet-1k vs MC-2B pretraining", "lines", ("table6", "table10", "table7"),
          (*VQA_PANELS, "in1k_linear"),
          series=(_size_series("Web-DINO (MC-2B)", "dino", "full2b", ("1b", "2b", "3b", "5b"), "C3"),
                  _size_series("Web-DINO (ImageNet-1k)", "dino", "in1k", ("1b", "2b", "3b", "5b"), "C7", "^")),
          xlabel="Model size (params)", xticks=_SIZE_TICKS[:4],
          note="The paper prints no IN-1k linear numbers for the ImageNet-1k-trained models.", run_note=_DATA_REGIMES))
_add(Item("fig7", "Classic vision vs model size (Web-DINO, 2B seen)", "lines", ("table7", "table3"), CLASSIC_METRICS,
          series=(_size_series("Web-DINO", "dino", "full2b", SIZES_2B, "C3"),),
          # The paper names the reference lines only "the largest official HF release"; these are
          # inferred to be Table 3's MetaCLIP ViT-G and DINOv2 ViT-g (518) rows (paper_facts.md §1).
          references=(Row("MetaCLIP ViT-G (HF)", "metaclip-g-224"), Row("DINOv2 ViT-g (HF)", "dinov2-g-518")),
          xlabel="Model size (params)", xticks=_SIZE_TICKS))
_add(Item(
    "fig9", "Alignment between vision encoders and language models (mutual k-NN)", "bars", (), (),
    rows=(Row("DINOv2 ViT-g", "dinov2-g-224"),
          *(Row(f"Web-DINO {s.upper()}", f"dino{s}-full2b-224") for s in SIZES_2B),
          Row("Web-DINO 7B, 4B seen", "dino7b-full4b-224"), Row("Web-DINO 7B, 8B seen", "dino7b-full8b-224")),
    note="The paper prints no alignment values (only the bars of Fig. 9).",
))


def get_item(item_id: str) -> Item:
    try:
        return ITEMS[item_id]
    except KeyError:
        raise KeyError(f"unknown paper item {item_id!r}; known: {', '.join(ITEMS)}") from None
