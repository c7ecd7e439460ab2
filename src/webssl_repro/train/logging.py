"""The training log: one JSON object per logged step, plus a progress bar on rank 0.

JSONL is what the paper stage reads back (loss curves, throughput) and what survives a
preempted job; lines of steps that a resumed run will redo are dropped on resume so the
file stays one line per step.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from webssl_repro.files import read_jsonl, write_text

LOG_NAME = "train_log.jsonl"


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The loggable entries of a ``training_step`` result: one-element tensors and numbers."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.detach().float().item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def read_log(run_dir: os.PathLike | str) -> list[dict[str, Any]]:
    """The run's step records; a line cut short is skipped (``files.read_jsonl``), and dropped
    when the logger rewrites the log on resuming."""
    return read_jsonl(Path(run_dir) / LOG_NAME)


class TrainLogger:
    """Appends records to ``run_dir/train_log.jsonl``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: os.PathLike | str, *, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.path = Path(run_dir) / LOG_NAME
        self._file = None
        self._bar = None
        if not enabled:
            return
        kept = [r for r in read_log(run_dir) if r.get("step", 0) <= start_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record.get('lr', 0.0):.3g}", refresh=False)

    def sync(self) -> None:
        """The lines so far on disk, before a checkpoint of their step: a resume keeps the lines up
        to its step and does not log those steps again, so a node crash must not take them."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
