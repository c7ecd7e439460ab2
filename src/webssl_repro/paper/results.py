"""The numbers behind one paper item, as a long frame ``source, metric, value, origin``.

At the published scale they come from the paper's tables; at a run scale from the
eval JSONs of this DAG, with off-the-shelf baselines taken from the paper and marked
``origin="published"``, unless the config imports and evaluates them (``pretrain.run_sources``).
Renderers see one frame either way, so a table is the same code at every scale.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import pandas as pd

from webssl_repro.evaluate.vqa.categories import MME_MAX, category_scores
from webssl_repro.files import read_json
from webssl_repro.metrics import (ALIGNMENT_PREFIX, CATEGORY_COLUMNS, CLASSIC_METRICS, DATA_PCT, LOWER_IS_BETTER,
                                  NO_IMAGE, NO_IMAGE_RESULTS, SE_PREFIX, VQA_BENCHMARKS)
from webssl_repro.paper import specs
from webssl_repro.paper.published import published_frame
from webssl_repro.releases import OFF_THE_SHELF
from webssl_repro.runs import Run, is_run_name, split_seed

COLUMNS = ["source", "metric", "value", "origin", "seed"]


def with_categories(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the four VQA categories (and Average, unless printed) for sources with all 16 benchmarks.

    A printed Average is kept as printed: the published render must show the paper's numbers.
    """
    extra = []
    for (source, origin, seed), group in frame.groupby(["source", "origin", "seed"], sort=False, dropna=False):
        values = dict(zip(group["metric"], group["value"]))
        if not all(b in values and not math.isnan(values[b]) for b in VQA_BENCHMARKS):
            continue
        scores = category_scores({b: values[b] for b in VQA_BENCHMARKS})
        for name, value in scores.items():
            if name not in values:
                extra.append({"source": source, "metric": name, "value": value, "origin": origin, "seed": seed})
    if not extra:
        return frame
    return pd.concat([frame, pd.DataFrame(extra, columns=COLUMNS)], ignore_index=True)


def published_results(item: specs.Item, directory: Optional[str | Path] = None) -> pd.DataFrame:
    if not item.published:
        return pd.DataFrame(columns=COLUMNS)
    frame = published_frame(list(item.published), directory)
    frame = frame[frame["source"].isin(item.sources)].copy()
    frame["origin"] = "published"
    frame["seed"] = 0
    return with_categories(frame[COLUMNS].reset_index(drop=True))


def is_no_image_result(path: Path) -> bool:
    """The answers without the image: the classic tasks' best (``results/{scale}/controls/no_image/
    classic.json``) and the VQA probe's on zero image tokens (``controls/blind/vqa.json``)."""
    return path.parent.parent.name == "controls" and (path.parent.name, path.name) in NO_IMAGE_RESULTS


def _valid_metric(path: Path, name: str, value: object) -> float:
    """One metric of an eval JSON of kind ``path.stem`` as a number, or an error naming the file,
    the key and what it should be: a renderer would show a misspelt key, a string or a NaN as
    "no number" and the check would call its claims not measurable, saying nothing."""
    kind = path.stem
    if kind == "vqa":
        known = name in VQA_BENCHMARKS or name in CATEGORY_COLUMNS
        expected = f"one of {', '.join((*VQA_BENCHMARKS, *CATEGORY_COLUMNS))}"
        top = MME_MAX if name == "mme" else 100.0
    elif kind == "classic":
        known, expected = name in CLASSIC_METRICS, f"one of {', '.join(CLASSIC_METRICS)}"
        top = math.inf if name in LOWER_IS_BETTER else 100.0
    elif kind == "alignment":
        known, expected, top = name.startswith(ALIGNMENT_PREFIX), f"{ALIGNMENT_PREFIX}<language model>", 1.0
    else:
        raise ValueError(f"{path}: an eval result is vqa.json, classic.json or alignment.json, not {path.name!r}")
    if not known:
        raise ValueError(f"{path}: unknown {kind} metric {name!r}; expected {expected}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: metric {name!r} has non-numeric value {value!r}")
    low = -1.0 if kind == "alignment" else 0.0
    if not (math.isfinite(value) and low <= value <= top):
        raise ValueError(f"{path}: metric {name!r} is {value!r}, not a finite number in [{low:g}, {top:g}]")
    return float(value)


def evaluable(source: str) -> bool:
    """A run of ours, or an off-the-shelf encoder a config may import and evaluate (``releases.OFF_THE_SHELF``)."""
    return is_run_name(source) or source in OFF_THE_SHELF


def eval_rows(path: str | Path, first_seed: int = 0) -> list[dict]:
    """Rows of one ``results/{scale}/evals/{run}[.s{seed}]/{kind}.json`` (``{"metrics": {name: value}}``);
    the run's directory without a suffix is ``first_seed``'s. The answers without the image
    (``is_no_image_result``) are source and origin ``no_image``."""
    path = Path(path)
    if is_no_image_result(path):
        run, seed, origin = NO_IMAGE, first_seed, NO_IMAGE
    else:
        (run, seed), origin = split_seed(path.parent.name, first_seed), "run"
        if not evaluable(run):
            raise ValueError(f"{path}: eval results must live under evals/<run>[.s<seed>]/ (a run or an imported "
                             f"off-the-shelf encoder), got {path.parent.name!r}")
    data = read_json(path)
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: 'metrics' is a {type(metrics).__name__}, not a mapping of metric to value")
    rows = [{"source": run, "metric": name, "value": _valid_metric(path, name, value), "origin": origin,
             "seed": seed} for name, value in metrics.items()]
    details = data.get("details") or {}
    if not isinstance(details, dict):
        raise ValueError(f"{path}: 'details' is a {type(details).__name__}, not a mapping")
    for name, value in details.items():  # a score's standard error, as metric "se/<score>"
        if name.endswith("/se") and isinstance(value, (int, float)):
            rows.append({"source": run, "metric": SE_PREFIX + name[:-len("/se")], "value": float(value),
                         "origin": origin, "seed": seed})
    return rows


def kept_percent(path: str | Path) -> float:
    """Table 2's "% of data" of one filter result (``data/filter/{light,heavy}.json``)."""
    data = read_json(path)
    try:
        return 100.0 * float(data["kept_fraction"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot read its kept_fraction: {type(err).__name__}: {err}") from None


def data_pct_rows(runs: Iterable[str], kept: Mapping[str, float], seed: int = 0) -> list[dict]:
    """The "% of data" each run trained on: all of it unfiltered, else its filter's kept share
    (``kept``: variant -> percent; a run whose filter result is not among them gets no row)."""
    rows = []
    for run in filter(is_run_name, runs):  # an off-the-shelf encoder has no share of our data
        data = Run.parse(run).data
        share = 100.0 if data == "full" else kept.get(data)
        if share is not None:
            rows.append({"source": run, "metric": DATA_PCT, "value": share, "origin": "run", "seed": seed})
    return rows


def is_filter_result(path: Path) -> bool:
    return path.parent.name == "filter" and path.stem in ("light", "heavy") and path.suffix == ".json"


def run_results(item: specs.Item, inputs: Iterable[str | Path]) -> pd.DataFrame:
    rows: list[dict] = []
    kept: dict[str, float] = {}
    for path in map(Path, inputs):
        if is_filter_result(path):
            kept[path.stem] = kept_percent(path)
        elif path.suffix == ".json":
            rows.extend(eval_rows(path))
    if DATA_PCT in item.metrics:
        rows.extend(data_pct_rows(item.runs, kept))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    # the paper's numbers for the baselines this config did not import and evaluate
    measured = set(frame["source"])
    baselines = [s for s in item.baselines if s not in measured]
    if baselines and item.published:
        published = published_results(item)
        frame = pd.concat([frame, published[published["source"].isin(baselines)]], ignore_index=True)
    return with_categories(frame)


def published_directory(source: str, inputs: Sequence[str | Path]) -> Optional[Path]:
    """Where an item's published numbers are read from: its inputs' folder at the published scale,
    else the default (``published.default_directory``)."""
    return Path(inputs[0]).parent if source == "published" and inputs else None


def item_results(item: specs.Item, source: str, inputs: Iterable[str | Path] = ()) -> pd.DataFrame:
    inputs = list(inputs)
    if source == "published":
        return published_results(item, published_directory(source, inputs))
    if source == "runs":
        return run_results(item, inputs)
    raise ValueError(f"unknown results source {source!r} (expected 'published' or 'runs')")


def value_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide view: one row per source, one column per metric, the mean over seeds."""
    if frame.empty:
        return pd.DataFrame()
    return frame.pivot_table(index="source", columns="metric", values="value", aggfunc="mean")


def lookup(wide: pd.DataFrame, source: str, metric: str) -> float:
    if source in wide.index and metric in wide.columns:
        return float(wide.loc[source, metric])
    return math.nan


__all__ = ["item_results", "value_table", "lookup", "with_categories"]
