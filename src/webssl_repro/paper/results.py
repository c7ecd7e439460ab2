"""The numbers behind one paper item, as a long frame ``source, metric, value, origin``.

At the published scale they come from the paper's tables; at a run scale from the
eval JSONs of this DAG, with off-the-shelf baselines (published-only rows) taken from
the paper and marked ``origin="published"``. Renderers see one frame either way, so a
table is the same code at every scale.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from webssl_repro.evaluate.vqa.categories import category_scores
from webssl_repro.metrics import DATA_PCT, VQA_BENCHMARKS
from webssl_repro.paper import specs
from webssl_repro.paper.published import published_frame
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


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read eval result {path}: {err}") from err


def eval_rows(path: str | Path) -> list[dict]:
    """Rows of one ``results/{scale}/evals/{run}/{kind}.json`` (``{"metrics": {name: value}}``)."""
    path = Path(path)
    run, seed = split_seed(path.parent.name)
    if not is_run_name(run):
        raise ValueError(f"{path}: eval results must live under evals/<run>/, got directory {run!r}")
    data = _read_json(path)
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: missing the 'metrics' mapping")
    rows = []
    for name, value in metrics.items():
        try:
            rows.append({"source": run, "metric": name, "value": float(value), "origin": "run", "seed": seed})
        except (TypeError, ValueError):
            raise ValueError(f"{path}: metric {name!r} has non-numeric value {value!r}") from None
    return rows


def filter_rows(path: str | Path, runs: Iterable[str]) -> list[dict]:
    """Table 2's "% of data": the kept fraction of the filter a run's data label names."""
    path = Path(path)
    data = _read_json(path)
    if "kept_fraction" not in data:
        raise ValueError(f"{path}: missing 'kept_fraction'")
    variant = path.stem
    return [{"source": r, "metric": DATA_PCT, "value": 100.0 * float(data["kept_fraction"]), "origin": "run", "seed": 0}
            for r in runs if Run.parse(r).data == variant]


def run_results(item: specs.Item, inputs: Iterable[str | Path]) -> pd.DataFrame:
    rows: list[dict] = []
    for path in inputs:
        path = Path(path)
        if path.parent.name == "filter":
            rows.extend(filter_rows(path, item.runs))
        elif path.suffix == ".json":
            rows.extend(eval_rows(path))
    # Unfiltered runs keep all of their data.
    if DATA_PCT in item.metrics:
        rows.extend({"source": r, "metric": DATA_PCT, "value": 100.0, "origin": "run", "seed": 0}
                    for r in item.runs if Run.parse(r).data == "full")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    baselines = [s for s in item.sources if s in specs.BASELINES]
    if baselines and item.published:
        published = published_results(item)
        frame = pd.concat([frame, published[published["source"].isin(baselines)]], ignore_index=True)
    return with_categories(frame)


def item_results(item: specs.Item, source: str, inputs: Iterable[str | Path] = ()) -> pd.DataFrame:
    inputs = list(inputs)
    if source == "published":
        directory = Path(inputs[0]).parent if inputs else None
        return published_results(item, directory)
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
