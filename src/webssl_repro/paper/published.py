"""The paper's published numbers, loaded from the checked-in TSVs in ``results/published``.

The TSVs hold the numbers exactly as printed (text, never recomputed), each row with the
paper table it comes from and its provenance; this module is the only place that parses
them, so that every renderer and check at the ``published`` scale sees one validated copy.
A malformed file fails loudly (file, row, column) instead of silently becoming NaN.
"""
from __future__ import annotations

import functools
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import pandas as pd

from webssl_repro.metrics import CLASSIC_METRICS, DATA_PCT, VQA_BENCHMARKS
from webssl_repro.paper.specs import BASELINES
from webssl_repro.runs import is_run_name

ENV_VAR = "WEBSSL_PUBLISHED_DIR"
KEY_COLUMNS: tuple[str, ...] = ("table", "row", "source")
PROVENANCE = "provenance"
LONG_COLUMNS: tuple[str, ...] = ("table", "row", "source", "model", "metric", "value", "provenance")

# Off-the-shelf encoders the paper compares against; every other result row is one of our runs.
BASELINE_SOURCES: tuple[str, ...] = tuple(BASELINES)

# file -> (text columns kept as metadata, numeric columns melted into the long frame), in file order.
# Table 3's ``res`` is a configuration of the row (also encoded in its source), not a result.
SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vqa.tsv": ((), (*VQA_BENCHMARKS, "Average")),
    "table2.tsv": ((), (DATA_PCT, "Average", "General", "Knowledge", "Vision-Centric", "OCR & Chart",
                        "chartqa", "ocrbench", "textvqa", "docvqa")),
    "table3.tsv": (("group", "pretrain_data", "samples_seen", "res"),
                   ("Average", "General", "Knowledge", "OCR & Chart", "Vision-Centric", *CLASSIC_METRICS)),
    "classic.tsv": ((), CLASSIC_METRICS),
    "table1.tsv": ((), ("width", "depth", "heads", "mlp")),
    "table4.tsv": ((), ("batch_size", "learning_rate", "warmup")),
    "table5.tsv": ((), ("learning_rate", "weight_decay", "batch_size")),
}

# file -> the paper tables its rows come from
FILE_TABLES: dict[str, tuple[str, ...]] = {
    "vqa.tsv": tuple(f"table{n}" for n in (6, 8, 10, 11, 12, 13, 14, 15)),
    "table2.tsv": ("table2",), "table3.tsv": ("table3",), "classic.tsv": ("table7", "table9"),
    "table1.tsv": ("table1",), "table4.tsv": ("table4",), "table5.tsv": ("table5",),
}
# the files whose rows are numbers of runs or baselines (the rest describe recipes)
RESULT_FILES: tuple[str, ...] = ("vqa.tsv", "classic.tsv", "table2.tsv", "table3.tsv")


def files_of_tables(tables: Iterable[str]) -> list[str]:
    """The TSVs that hold the rows of the given paper tables, each once, in order."""
    files = []
    for table in tables:
        found = [file for file, of_file in FILE_TABLES.items() if table in of_file]
        if not found:
            raise ValueError(f"{table}: no published TSV holds this paper table "
                             f"(the files hold {sorted({t for ts in FILE_TABLES.values() for t in ts})})")
        files.append(found[0])
    return list(dict.fromkeys(files))


# The recipe tables' rows name what they describe; a result row's source is one of our runs or a
# baseline, else its numbers would reach no item and render as a row of "no number".
RECIPE_SOURCES: dict[str, tuple[str, ...]] = {
    "table1.tsv": tuple(f"vit-{s}" for s in ("1b", "2b", "3b", "5b", "7b")),
    "table4.tsv": ("web-dino", "web-mae", "clip"), "table5.tsv": ("stage1", "stage2"),
}


def _known_source(file: str, source: str) -> bool:
    if file in RECIPE_SOURCES:
        return source in RECIPE_SOURCES[file]
    return is_run_name(source) or source in BASELINE_SOURCES


def default_directory() -> Path:
    """``$WEBSSL_PUBLISHED_DIR`` if set, else the repo's ``results/published`` next to ``src/``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "results" / "published"


def _resolve(directory: Union[str, Path, None]) -> Path:
    return (Path(directory) if directory is not None else default_directory()).resolve()


def _decimals(text: str) -> int:
    """Digits after the point as printed ('52.6' -> 1, '1.00e-5' -> 7): the printing precision."""
    exponent = Decimal(text).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _read_file(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse one TSV into (long numeric rows with printed decimals, text metadata rows)."""
    text_cols, num_cols = SCHEMA[path.name]
    if not path.is_file():
        raise ValueError(f"{path}: published TSV is missing")
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.ParserError as err:  # e.g. a row with a tab too many
        raise ValueError(f"{path}: not a table of tab-separated columns: {err}") from None
    expected = (*KEY_COLUMNS, *text_cols, *num_cols, PROVENANCE)
    missing = [c for c in expected if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {missing}; expected {list(expected)}")
    extra = [c for c in raw.columns if c not in expected]
    if extra:
        raise ValueError(f"{path}: unexpected column(s) {extra}; expected {list(expected)}")

    long_rows, meta_rows = [], []
    for i, rec in enumerate(raw.to_dict("records")):
        where = f"{path}: line {i + 2} (row {rec['row']!r})"
        for col in (*KEY_COLUMNS, PROVENANCE, *text_cols):
            if not rec[col].strip():
                raise ValueError(f"{where}, column {col!r}: empty")
        if rec["table"] not in FILE_TABLES[path.name]:
            raise ValueError(f"{where}, column 'table': {rec['table']!r} is not one of {path.name}'s tables "
                             f"({', '.join(FILE_TABLES[path.name])})")
        if not _known_source(path.name, rec["source"]):
            expected = ", ".join(RECIPE_SOURCES.get(path.name, ("a run name (dino7b-full2b-224)",
                                                                 *BASELINE_SOURCES)))
            raise ValueError(f"{where}, column 'source': {rec['source']!r} is not one of {expected}")
        for col in num_cols:
            cell = rec[col].strip()
            try:
                value = Decimal(cell)
                if not value.is_finite():
                    raise InvalidOperation
            except InvalidOperation:
                raise ValueError(f"{where}, column {col!r}: {rec[col]!r} is not a number") from None
            long_rows.append({
                "table": rec["table"], "row": rec["row"], "source": rec["source"], "model": rec["row"],
                "metric": col, "value": float(value), "provenance": rec[PROVENANCE],
                "decimals": _decimals(cell),
            })
        if text_cols:
            meta_rows.append({c: rec[c] for c in (*KEY_COLUMNS, *text_cols, PROVENANCE)})
    return pd.DataFrame(long_rows), pd.DataFrame(meta_rows)


@functools.lru_cache(maxsize=8)
def _load(directory: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    frames, meta = [], {}
    for name in SCHEMA:
        long, text = _read_file(directory / name)
        frames.append(long)
        if not text.empty:
            meta[name] = text
    frame = pd.concat(frames, ignore_index=True)
    dup = frame.duplicated(["table", "row", "metric"], keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise ValueError(f"{directory}: row {first['row']!r} of {first['table']} appears more than once")
    return frame, meta


def _load_with_decimals(directory: Union[str, Path, None]) -> pd.DataFrame:
    return _load(_resolve(directory))[0].copy()


def load_published(directory: Union[str, Path, None] = None) -> pd.DataFrame:
    """Every printed number as one row: ``table, row, source, model, metric, value, provenance``.

    ``model`` repeats the paper's row label (the design's public contract names it ``model``).
    """
    return _load_with_decimals(directory).loc[:, list(LONG_COLUMNS)]


def load_table3_metadata(directory: Union[str, Path, None] = None) -> pd.DataFrame:
    """Table 3's descriptive columns (group, pretrain_data, samples_seen as printed text, res)."""
    return _load(_resolve(directory))[1]["table3.tsv"].copy()


#: (source, metric) printed with different values in different tables of the paper, and why.
PRINTED_DISAGREEMENTS = {
    ("ijepa-h-224", "Average"): "Table 14 prints 44.78 and Table 3 44.7; Table 14's own scores average to 44.30 "
                                "(one of its OCR scores is most likely mistyped)",
}


def published_frame(tables: Union[str, Iterable[str]], directory: Union[str, Path, None] = None,
                    sources: Optional[Callable[[str], bool]] = None, decimals: bool = False) -> pd.DataFrame:
    """The printed numbers of ``tables`` as ``source, metric, value``, one row per (source, metric),
    of the sources ``sources`` keeps (default all); ``decimals``: with the printed decimals of each.

    A run printed in several tables (e.g. Web-DINO-7B 2B-seen in Tables 6 and 8, or rounded again
    in Table 2/3) must agree to the coarser printing precision; the more precise value is kept.
    A real disagreement raises, unless the paper's own (``PRINTED_DISAGREEMENTS``), which keeps the
    more precise value too.
    """
    wanted = [tables] if isinstance(tables, str) else list(tables)
    tables_of_files = sorted({t for ts in FILE_TABLES.values() for t in ts}, key=lambda t: int(t[5:]))
    bad = [t for t in wanted if t not in tables_of_files]
    if bad:
        raise ValueError(f"published_frame: not table ids: {bad} (expected one of {', '.join(tables_of_files)})")
    frame = _load_with_decimals(directory)
    frame = frame[frame["table"].isin(wanted)]
    absent = sorted(set(wanted) - set(frame["table"]))
    if absent:
        raise ValueError(f"published_frame: no published numbers for {absent}")
    if sources is not None:
        frame = frame[frame["source"].map(sources)]

    out = []
    for (source, metric), group in frame.groupby(["source", "metric"], sort=False):
        best = group.sort_values("decimals", ascending=False, kind="stable").iloc[0]
        for _, other in group.iterrows():
            tolerance = 0.5 * 10.0 ** -min(best["decimals"], other["decimals"]) + 1e-9
            if abs(other["value"] - best["value"]) > tolerance and (source, metric) not in PRINTED_DISAGREEMENTS:
                raise ValueError(
                    f"published_frame: {source} {metric} disagrees between {best['table']} "
                    f"({best['value']:g}) and {other['table']} ({other['value']:g})"
                )
        out.append({"source": source, "metric": metric, "value": float(best["value"]),
                    "decimals": int(best["decimals"])})
    return pd.DataFrame(out, columns=["source", "metric", "value", "decimals"]).drop(
        columns=[] if decimals else ["decimals"])
