"""What a job computes vs how it runs.

A rule's params are what Snakemake compares to decide whether a finished job is out of date,
so they must hold only what changes the result. The keys in ``SETTINGS`` change how a job
runs (log cadence, decoding workers, where a dataset sits on disk): they travel in the shell
command as ``--settings-json`` instead, and the CLI lays them back onto the params.
"""
from __future__ import annotations

from typing import Any, Mapping

_DATA_PLACE = {"local_dir": None, "image_root": None}
#: when a long evaluation saves its progress and stops before its time limit (evaluate/progress.py)
_PROGRESS = {"checkpoint_every_min": None, "stop_margin_s": None}
#: Keys that change how a job runs, not what it computes (``split_settings``):
#: kept out of the rules' params, so that changing them reruns nothing, and passed to the
#: CLI as ``--settings-json``. Text filter: its loader workers, OCR threads, where the OCR
#: reads are cached and after how many shards it saves its decisions (the kept shards are the
#: same; a rerun filter would retrain every filtered run). Pretraining: the log and checkpoint
#: cadence, the stop margin, recomputing blocks in the backward. Classic: the encoder's
#: forward chunking, decoding workers and scratch disk. Classic and VQA: when a job saves its progress and how long before its time limit it stops. Alignment: batch sizes (not
#: ``lm_paths``: a path or hub id there says which weights a name loads). VQA: where
#: Cambrian's files sit on disk, and the memory knobs: micro-batches (a global batch's loss and
#: gradient do not depend on its split, ``probe.backward_global_batch``) and recomputing the
#: decoder layers in the backward.
SETTINGS = {
    "filter": {"filter": {"workers": None, "threads": None, "cache_path": None, "checkpoint_shards": None,
                          "max_broken_shards": None}},
    "pretrain": {"train": {"log_every": None, "checkpoint_every": None, "stop_margin_s": None,
                           "activation_checkpointing": None}},
    "classic": {"batch_size": None, "workers": None, "scratch": None, **_PROGRESS},
    "alignment": {"batch_size": None, "lm_batch_size": None},
    "vqa": {"data": {"alignment": _DATA_PLACE, "instruction": _DATA_PLACE}, "gradient_checkpointing": None,
            "stage1": {"micro_batch_size": None}, "stage2": {"micro_batch_size": None}, **_PROGRESS},
}
#: the job that trains the VQA probe (``vqa.trained``) has the same settings as the one answering with it
SETTINGS["vqa_probe"] = SETTINGS["vqa"]


def split_settings(section: Mapping[str, Any], spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``section`` as (what a job computes, how it runs), by ``spec``: a key mapped to None is
    a setting (log cadence, worker count, where a dataset sits on disk); a key mapped to a
    mapping splits that sub-section the same way. The rules put only the first in their
    params, so that changing a setting reruns nothing (``Plan.settings_json``)."""
    what: dict[str, Any] = {}
    how: dict[str, Any] = {}
    for key, value in section.items():
        sub = spec.get(key, ...)
        if sub is None:
            how[key] = value
        elif isinstance(sub, Mapping) and isinstance(value, Mapping):
            w, h = split_settings(value, sub)
            what[key] = w
            if h:
                how[key] = h
        else:
            what[key] = value
    return what, how


def split_pretrain(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's config as (what its weights depend on, how it runs): ``SETTINGS["pretrain"]``,
    and the whole ``loader`` where the corpus is held in memory, whose batches are the same for
    any number of workers (``data.corpus``). A streamed corpus's order depends on its readers,
    so there ``loader`` stays with what the run computes."""
    spec = SETTINGS["pretrain"]
    if not (cfg.get("loader") or {}).get("stream", False):
        spec = {**spec, "loader": None}
    return split_settings(cfg, spec)


def merge_nested(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid onto ``base``, nested sections merged, keys ``base`` lacks kept: the
    inverse of ``split_settings`` (the CLI lays ``--settings-json`` back onto the params),
    and the benchmarks' ``--set`` overrides. ``config.merge_known`` is its strict twin."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            value = merge_nested(out[key], value)
        out[key] = value
    return out
