"""Whether a run's checkpoints belong to the job about to resume them.

A run's checkpoints live outside its declared outputs, so that a preempted or failed job's
retry resumes them (``Plan.checkpoint_dir``). Snakemake therefore never removes them: when it
reruns a run because its config or inputs changed, the new job would find the old run's
checkpoint, and either refuse it (a loop setting changed) or, worse, find the budget spent
and write the old weights out under the new provenance. The rule calls ``guard_checkpoints``
once before launching: it stamps the directory with what the run is trained from (its config
slice without the settings of ``webssl_repro.settings``, a digest of each data file, the size
and mtime of each generated shard and of the parent checkpoint), and sets a directory stamped
otherwise aside under a ``.stale-<time>`` name, so the job starts fresh and nothing computed
is deleted. ``adopt`` stamps an unstamped directory instead (checkpoints written before
stamps existed, known to be the current run's).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from webssl_repro.files import read_json, write_json

STAMP = "fingerprint.json"


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(cfg: Mapping[str, Any], data: Sequence[str | Path], parent: Optional[str | Path] = None
                    ) -> dict[str, Any]:
    """What the run's weights depend on, as plain JSON. The parent (a hi-res fine-tune's
    224 px state, GBs at paper scale) is identified by size and mtime, not read."""
    from webssl_repro.settings import split_pretrain

    config = split_pretrain({k: v for k, v in cfg.items() if not k.startswith("_")})[0]
    inputs: dict[str, Any] = {"data": [_sha256(p) for p in data]}
    shards = _generated_shards(data[0]) if data else []
    if shards:  # this project wrote them: a regenerated corpus may keep its manifest byte for byte
        inputs["shards"] = [[st.st_size, st.st_mtime_ns] for st in map(os.stat, shards)]
    if parent is not None:
        st = os.stat(parent)
        inputs["parent"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return json.loads(json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str))


def _generated_shards(manifest: str | Path) -> list[Path]:
    """The shard files of a corpus this project generated (mini-web); none for the user's own
    shards (MC-2B), which the manifest names and which a rerun does not rewrite."""
    try:
        meta = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or not meta.get("generated"):
        return []
    return [Path(manifest).parent / name for name in meta.get("shards", [])]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two fingerprints differ (for the message, not the decision)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


def guard_checkpoints(checkpoints: str | Path, fingerprint: Mapping[str, Any], adopt: bool = False
                      ) -> Optional[Path]:
    """Stamp ``checkpoints`` with ``fingerprint``; a non-empty directory stamped otherwise (or
    not at all, unless ``adopt``) is renamed aside first. Returns where it went, or None."""
    checkpoints = Path(checkpoints)
    stamp = checkpoints / STAMP
    moved = None
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        saved = read_json(stamp) if stamp.exists() else None
        if saved != fingerprint and not (adopt and saved is None):
            moved = checkpoints.with_name(f"{checkpoints.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
            suffix = 1
            while moved.exists():
                moved, suffix = moved.with_name(f"{moved.name.split('~')[0]}~{suffix}"), suffix + 1
            checkpoints.rename(moved)
            changed = "no fingerprint" if saved is None else ", ".join(differences(saved, dict(fingerprint)))
            print(f"{checkpoints}: checkpoints of another config or inputs ({changed}); "
                  f"set aside as {moved.name}, training starts afresh")
    write_json(stamp, dict(fingerprint), indent=1, sort_keys=True)
    return moved
