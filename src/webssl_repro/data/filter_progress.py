"""A filter job's decisions saved chunk by chunk, so that a job stopped at its time limit or
preempted resumes at the first chunk of shards it had not finished.

At paper scale one filter part is ~100 shards (~1M images) and 12 hours of one GPU; without
this a retry started from its first image. Each chunk's record (``<out>.progress/NNNNN.json``)
holds what ``run_filter_batches`` returns for those shards, under a key of everything that
decides it (variant, backend and its options, the chunk's shards with each local file's size
and modification time): a record of another filter setup, or of other or rewritten shards, is
filtered again, not reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from webssl_repro.files import read_json, write_json

#: shards a chunk takes unless ``data.filter.checkpoint_shards`` says otherwise: at paper scale
#: ~100k images, minutes of a GPU, against the seconds a chunk's loader workers take to start
CHECKPOINT_SHARDS = 10


def progress_dir(out_json: str) -> str:
    return os.path.splitext(out_json)[0] + ".progress"


def _shard_stamp(url: str) -> Any:
    """What tells a rewritten local shard from the one a record was made of (a corpus rebuilt
    under the same names); a remote shard is known by its URL alone."""
    try:
        st = os.stat(url)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def chunk_key(setup: Mapping[str, Any], shards: Sequence[str]) -> str:
    text = json.dumps({"setup": dict(setup), "shards": [[url, _shard_stamp(url)] for url in shards]},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _load(path: str, key: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        record = read_json(path)
    except ValueError:  # cut short by the kill it is meant to survive: filter the chunk again
        return None
    return record["result"] if record.get("key") == key else None


def run_in_chunks(shards: Sequence[str], setup: Mapping[str, Any], out_json: str,
                  run_chunk: Callable[[list[str]], dict[str, Any]],
                  chunk_shards: int = CHECKPOINT_SHARDS, after_chunk: Callable[[], None] | None = None) -> dict[str, Any]:
    """``run_chunk`` (``run_filter_batches``' result for some shards) over ``shards`` in chunks of
    ``chunk_shards``, each saved as it ends and read back instead of rerun; the chunks joined
    as one pass over all shards would return them. ``after_chunk`` runs after each new chunk
    (the OCR backend saves its read cache). A chunk with an unreadable shard is not saved
    (``_read_in_part``). The records are removed once all are joined."""
    if chunk_shards < 1:
        raise ValueError(f"data.filter.checkpoint_shards must be >= 1, got {chunk_shards}")
    folder = progress_dir(out_json)
    results = []
    for k, start in enumerate(range(0, len(shards), chunk_shards)):
        chunk = list(shards[start:start + chunk_shards])
        path, key = os.path.join(folder, f"{k:05d}.json"), chunk_key(setup, chunk)
        result = _load(path, key)
        if result is None:
            result = run_chunk(chunk)
            if not _read_in_part(result):
                write_json(path, {"key": key, "shards": chunk, "result": result})
            if after_chunk is not None:
                after_chunk()
        results.append(result)
    return join_results(results)


def _read_in_part(result: Mapping[str, Any]) -> bool:
    """Whether a shard of the chunk could not be read. Its record is not saved: the chunk's key
    (URLs, sizes, times) would not change after a transient error (a network mount's hiccup, an
    unreachable remote shard), and every retry would reuse the record without those shards."""
    return int((result.get("loader_stats") or {}).get("broken_shards", 0)) > 0


def discard_progress(out_json: str) -> None:
    """Once the job's result is written: its chunks' records are in it."""
    shutil.rmtree(progress_dir(out_json), ignore_errors=True)


def join_results(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``run_filter_batches``' results of consecutive chunks as one result over all of them."""
    if not results:
        raise ValueError("join_results: no chunks")
    variants = list(results[0]["decisions"])
    truths = [r["truth"] for r in results]
    stats = [r["loader_stats"] for r in results if r["loader_stats"] is not None]
    seconds = sum(float(r["seconds"]) for r in results)
    n = sum(len(r["ids"]) for r in results)
    return {
        "ids": [i for r in results for i in r["ids"]],
        "sources": [tuple(s) for r in results for s in r["sources"]],  # JSON made the triples lists
        "decisions": {v: [d for r in results for d in r["decisions"][v]] for v in variants},
        "truth": None if any(t is None for t in truths) else {v: [x for t in truths for x in t[v]] for v in variants},
        "seconds": seconds, "cpu_seconds": sum(float(r["cpu_seconds"]) for r in results),
        "images_per_second": n / seconds if seconds > 0 else float("inf"), "backend": results[0]["backend"],
        "loader_stats": {k: sum(int(s[k]) for s in stats) for k in stats[0]} if stats else None,
        # a chunk saved before the count was kept leaves the job's count unknown
        "off_topic": None if any("off_topic" not in r for r in results) else sum(int(r["off_topic"]) for r in results),
    }
