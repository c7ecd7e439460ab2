"""The data stage as the workflow calls it: ``webssl-repro data {shards,in1k,filter,filter-merge,evalset,fig8}``.

Each command reads the config's ``data`` section (``--data-json``) and writes one declared
output: a shard manifest, a filter result (counts, and the kept samples' shards as a
manifest lists them), or an eval-set manifest. Config keys (all optional at mini scale;
defaults below):

    data:
      corpus:   {seed: 0, n_images: 4096, shard_size: 512, size: 64, image_format: jpg, kinds: {...}}
      in1k:     {seed: 1, n_images: 1600, shard_size: 400, size: 64}
      shards:   "/datasets/mc2b/{000000..199999}.tar"   # paper scale: use these, generate nothing
      filter:   {backend: ocr, ocr_size: 256}            # or {backend: mllm, model: ..., device: cuda}
      evalsets: {size: 64, base: 0, classification: {train: 1600, val: 320, test: 320}, ...,
                 vqa: {train: 300, val: 50, test: 100}}  # vqa counts are per benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from collections import Counter
from functools import partial
from multiprocessing import get_context
from typing import Any, Mapping, Sequence

from webssl_repro.data.evalsets import ALIGNMENT_PAIRS
from webssl_repro.data.filter_progress import CHECKPOINT_SHARDS, discard_progress, run_in_chunks
from webssl_repro.data.shards import is_local, shard_ranges, write_shard
from webssl_repro.data.loader import expand_sources
from webssl_repro.files import read_json, write_json

CORPUS_DEFAULTS = {"seed": 0, "n_images": 4096, "shard_size": 512, "size": 64, "image_format": "jpg"}
IN1K_DEFAULTS = {"seed": 1, "n_images": 1600, "shard_size": 400, "size": 64, "image_format": "jpg"}
EVAL_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"train": 1600, "val": 320, "test": 320},
    "segmentation": {"train": 800, "val": 200, "test": 200},
    "depth": {"train": 800, "val": 200, "test": 200},
    "captions": {"test": ALIGNMENT_PAIRS},  # WIT-1024's size
    "vqa": {"train": 300, "val": 50, "test": 100},
}


def _write_one(job: tuple[str, int, int, int, dict[str, Any], str]) -> dict[str, Any]:
    path, seed, start, count, cfg, fmt = job
    return write_shard(path, seed, start, count, cfg, image_format=fmt)


def build_corpus(section: Mapping[str, Any], out_manifest: str, threads: int = 1, source: str = "web") -> dict[str, Any]:
    """Write the shards of one generated corpus (in parallel) and a manifest listing them."""
    if "shards" in section:  # real data: the manifest just points at the user's shards
        manifest: dict[str, Any] = {"shards": user_shards(section["shards"], source), "generated": False}
    else:
        defaults = IN1K_DEFAULTS if source == "in1k" else CORPUS_DEFAULTS
        unknown = sorted(set(section) - set(defaults) - {"kinds"})
        if unknown:  # e.g. a misspelt "shards": the generator would silently stand in for the real data
            raise KeyError(f"data.{'in1k' if source == 'in1k' else 'corpus'}: unknown key(s) {unknown}; a generated "
                           f"corpus takes {sorted({*defaults, 'kinds'})}, real data takes 'shards'")
        c = {**defaults, **section}
        cfg = {"size": int(c["size"]), "source": source, **({"kinds": dict(c["kinds"])} if "kinds" in c else {})}
        out_dir = os.path.dirname(os.path.abspath(out_manifest))
        names = [f"shard-{k:05d}.tar" for k, _ in enumerate(shard_ranges(int(c["n_images"]), int(c["shard_size"])))]
        jobs = [(os.path.join(out_dir, n), int(c["seed"]), start, count, cfg, str(c["image_format"]))
                for n, (start, count) in zip(names, shard_ranges(int(c["n_images"]), int(c["shard_size"])))]
        if threads > 1:
            with get_context("spawn").Pool(min(threads, len(jobs))) as pool:
                summaries = pool.map(_write_one, jobs)
        else:
            summaries = [_write_one(j) for j in jobs]
        manifest = {"shards": names, "generated": True, "seed": int(c["seed"]), "n_images": int(c["n_images"]),
                    "config": cfg,
                    "has_text": sum(s["has_text"] for s in summaries) / max(1, int(c["n_images"])),
                    "is_chart_table_doc": sum(s["is_chart_table_doc"] for s in summaries) / max(1, int(c["n_images"]))}
    _dump(manifest, out_manifest)
    return manifest


def user_shards(spec: str | Sequence[str], source: str = "web") -> list[str]:
    """The shard list ``data.shards`` (or ``data.in1k.shards``) names: local files must exist, so
    a wrong path fails here rather than in thousands of filter or training jobs."""
    key = "data.in1k.shards" if source == "in1k" else "data.shards"
    urls = expand_sources(spec)
    if not urls:
        raise ValueError(f"{key}: {spec!r} names no shards")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{key}: {len(missing)} of {len(urls)} shard(s) are not files, e.g. {missing[:3]}")
    return urls


def _dump(obj: Any, path: str) -> None:
    write_json(path, obj, indent=1, sort_keys=True)


def manifest_shards(path: str) -> list[str]:
    from webssl_repro.data.corpus import read_manifest

    return read_manifest(path)["shards"]


def filter_corpus(variant: str, section: Mapping[str, Any], shards: Sequence[str], out_json: str,
                  part: int = 0) -> dict[str, Any]:
    """Run one filter variant over a corpus, or over its ``part``-th of ``section["parts"]``
    (every parts-th shard), so a corpus of billions of images is filtered by many jobs at once
    (``filter_merge`` joins them). The kept samples are copied into shards of their own beside
    ``out_json`` (``kept_shards``), which the result lists as a manifest does, with the kept
    fraction, P/R and speed; the light and heavy runs train on those shards. Decisions are saved
    every ``checkpoint_shards`` shards (``data.filter_progress``): a rerun resumes after them."""
    from webssl_repro.data.filters import filter_batch, filter_report, make_filter, run_filter, run_filter_batches
    from webssl_repro.data.loader import make_loader

    opts = dict(section)
    backend = str(opts.pop("backend", "ocr"))
    parts = int(opts.pop("parts", 1))
    workers = int(opts.pop("workers", 0))  # loader processes that decode and encode beside the backend
    chunk_shards = int(opts.pop("checkpoint_shards", CHECKPOINT_SHARDS))
    max_broken = int(opts.pop("max_broken_shards", 0))  # shards known to be corrupt for good
    if not 0 <= part < parts:
        raise ValueError(f"filter part {part} of data.filter.parts={parts}")
    corpus_shards, shards = len(shards), list(shards)[part::parts]
    if not shards:
        raise ValueError(f"data filter {variant}: part {part} of data.filter.parts={parts} has no shard "
                         f"(the corpus has {corpus_shards}): set parts to at most {corpus_shards}")
    # what decides a decision: a saved chunk of another setup is filtered again (how it runs is not)
    # (batches within shards: chunks saved before 5922236 batched across them, which a batched MLLM can tell)
    # (sources by position: chunks saved before it name a kept sample by key, which a shard may repeat)
    setup = {"variant": variant, "backend": backend, "batches": "within-shards", "sources": "key-and-position",
             **{k: v for k, v in opts.items() if k not in ("threads", "cache_path")}}
    if backend == "ocr":
        suffix = f".part{part}" if parts > 1 else ""
        opts.setdefault("cache_path", os.path.join(os.path.dirname(os.path.abspath(out_json)),
                                                   f"ocr_reads_{opts.get('ocr_size', 256)}{suffix}.json"))
    flt = make_filter(backend, **opts)
    read = dict(shuffle_shards=False, rank=0, world_size=1, report_stats=True)

    def run_chunk(chunk: list[str]) -> dict[str, Any]:
        if workers:
            return run_filter_batches(flt, make_loader(chunk, num_workers=min(workers, len(chunk)),
                                                       batch_size=flt.batch_size, within_shards=True,
                                                       collate_fn=partial(filter_batch, flt, [variant]), **read),
                                      [variant])
        return run_filter(flt, make_loader(chunk, **read), [variant])

    res = run_in_chunks(shards, setup, out_json, run_chunk, chunk_shards, getattr(flt, "save_cache", None))
    stats = res["loader_stats"]
    if not res["ids"]:  # a kept fraction, P/R and speed of no sample would be 0 / NaN / inf
        raise ValueError(f"data filter {variant}: no sample read from the {len(shards)} shard(s) of part {part} "
                         f"of {parts} ({stats['skipped_samples']} undecodable sample(s), "
                         f"{stats['broken_shards']} unreadable shard(s)): {', '.join(shards[:3]) or 'no shards'}")
    if stats["broken_shards"] > max_broken:  # a mount's hiccup must not drop a shard from the filtered data
        raise ValueError(f"data filter {variant}: {stats['broken_shards']} shard(s) of part {part} of {parts} could "
                         "not be read (warned above); the other shards' decisions are saved, and a rerun reads "
                         "again only the chunks holding these. Shards corrupt for good: set "
                         f"data.filter.max_broken_shards to {stats['broken_shards']} (now {max_broken})")
    rep = filter_report(res["ids"], res["decisions"], res["truth"])[variant]
    kept = kept_shards(shards, [src for src, k in zip(res["sources"], res["decisions"][variant]) if k],
                       os.path.splitext(out_json)[0])
    here = os.path.dirname(os.path.abspath(out_json))
    out = {"variant": variant, "backend": flt.name, **{k: v for k, v in rep.items() if k != "kept_ids"},
           "n_kept": len(rep["kept_ids"]), "shards": [os.path.relpath(p, here) for p in kept], "generated": True,
           "images_per_second": res["images_per_second"], "cpu_seconds": res["cpu_seconds"],
           "skipped_samples": stats["skipped_samples"], "broken_shards": stats["broken_shards"],
           "off_topic": res["off_topic"]}
    if res["off_topic"]:  # resumed chunks' answers are not warned about again: the whole job's count
        warnings.warn(f"data filter {variant}: {res['off_topic']} of {len(res['ids'])} answers began with neither yes "
                      "nor no and were dropped as a no (off_topic in the result)", RuntimeWarning, stacklevel=2)
    _dump(out, out_json)
    discard_progress(out_json)
    return out


def kept_shards(shards: Sequence[str], kept: Sequence[tuple[str, str, int]], out_dir: str) -> list[str]:
    """The kept (shard, key, position in the shard) samples copied, in corpus order, into one tar
    per source shard that keeps any (``out_dir``/00000.tar, ...); returns their paths."""
    from webssl_repro.data.shards import write_selected_shard

    by_shard: dict[str, list[tuple[str, int]]] = {}
    for url, key, index in kept:
        by_shard.setdefault(url, []).append((key, index))
    if os.path.isdir(out_dir):  # a rerun replaces the kept shards of the last one
        for old in os.listdir(out_dir):
            if old.endswith(".tar"):
                os.remove(os.path.join(out_dir, old))
    paths = []
    for k, url in enumerate(shards):
        if url in by_shard:
            written = write_selected_shard(url, by_shard[url], os.path.join(out_dir, f"{k:05d}.tar"))
            wanted = len(set(by_shard[url]))
            if written["count"] != wanted:
                raise RuntimeError(f"{url}: copied {written['count']} of its {wanted} kept samples "
                                   f"into {written['path']} (the shard could not be read again)")
            paths.append(written["path"])
    return paths


def filter_merge(part_jsons: Sequence[str], out_json: str) -> dict[str, Any]:
    """The filter result of a whole corpus from those of its parts (``filter_corpus``): their
    counts merged and their kept shards listed relative to ``out_json``."""
    from webssl_repro.data.filters import merge_reports

    parts, shards = [], []
    here = os.path.dirname(os.path.abspath(out_json))
    repeated = sorted(p for p, n in Counter(part_jsons).items() if n > 1)
    if repeated:
        raise ValueError(f"filter-merge: part(s) listed more than once would count twice: {repeated}")
    for path in part_jsons:
        parts.append(read_json(path))
        if "shards" not in parts[-1] or parts[-1].get("variant") != parts[0].get("variant"):
            raise ValueError(f"filter-merge: {path} is not a part of the {parts[0].get('variant')} filter result "
                             f"(variant {parts[-1].get('variant')!r}, {'with' if 'shards' in parts[-1] else 'no'} "
                             "'shards')")
        base = os.path.dirname(os.path.abspath(path))
        shards += [os.path.relpath(os.path.join(base, s), here) for s in parts[-1]["shards"]]
    out = {**merge_reports(parts), "shards": shards, "generated": True}
    _dump(out, out_json)
    return out


def merge_parts(parts: Sequence[str] | None, pattern: str | None, count: int | None) -> list[str]:
    """The part files ``filter-merge`` reads: listed, or ``pattern`` with ``{part}`` for 0 .. ``count`` - 1."""
    if parts:
        return list(parts)
    if "{part}" not in str(pattern) or count is None or count < 1:
        raise ValueError(f"filter-merge --part-pattern {pattern!r} needs '{{part}}' and --count >= 1 (got {count})")
    return [pattern.replace("{part}", str(k)) for k in range(count)]


def fig8_grid(shards: Sequence[str], light_json: str, heavy_json: str, out_prefix: str, per_row: int = 8) -> list[str]:
    """Fig. 8 analogue: the first raw samples of the corpus and the first light- and heavy-kept
    ones, read from the filters' own shards."""
    from webssl_repro.data.corpus import read_manifest
    from webssl_repro.data.filters import sample_grid
    from webssl_repro.data.loader import make_loader

    rows: dict[str, list[Any]] = {}
    for name, source in (("raw", list(shards)), ("light", light_json), ("heavy", heavy_json)):
        urls = source if isinstance(source, list) else read_manifest(source)["shards"]
        rows[name] = []
        for s in make_loader(urls, shuffle_shards=False, rank=0, world_size=1) if urls else ():
            rows[name].append(s["image"])
            if len(rows[name]) >= per_row:
                break
    return sample_grid(rows["raw"], rows["light"], rows["heavy"], out_prefix, per_row)


def build_evalset(task: str, section: Mapping[str, Any], out_json: str) -> dict[str, Any]:
    """Eval tars of one task (``vqa``: all 16 benchmarks) beside ``out_json``, which lists them."""
    from webssl_repro.data.evalsets import write_evalset
    from webssl_repro.metrics import VQA_BENCHMARKS

    if task not in EVAL_DEFAULTS:
        raise KeyError(f"build_evalset: unknown task {task!r}; known {list(EVAL_DEFAULTS)}")
    if section.get("source") == "hf" and task != "vqa":  # paper scale: the real datasets
        from webssl_repro.data.real_evalsets import build_hf_manifest

        manifest = build_hf_manifest(task, dict(section.get(task, {})))
        _dump(manifest, out_json)
        return manifest
    size, base = int(section.get("size", 64)), int(section.get("base", 0))
    counts = dict(section.get(task) or EVAL_DEFAULTS[task])  # a configured task lists all its splits
    out_dir = os.path.join(os.path.dirname(os.path.abspath(out_json)), task)
    subtasks = list(VQA_BENCHMARKS) if task == "vqa" else ["alignment" if task == "captions" else task]
    splits: dict[str, dict[str, str]] = {}
    for split, n in counts.items():
        for sub in subtasks:
            name = f"{sub}-{split}.tar"
            write_evalset(os.path.join(out_dir, name), sub, split, int(n), size, base)
            splits.setdefault(split, {})[sub] = os.path.join(task, name)
    manifest = {"task": task, "size": size, "base": base, "counts": counts, "splits": splits}
    _dump(manifest, out_json)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="webssl-repro data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("shards", "in1k"):
        p = sub.add_parser(name)
        p.add_argument("--data-json", default="{}")
        p.add_argument("--out", required=True)
        p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("filter")
    p.add_argument("variant", choices=("light", "heavy"))
    p.add_argument("--data-json", default="{}")
    p.add_argument("--settings-json", default="{}", help="how it runs: data.filter's workers, threads, cache_path "
                   "(settings.SETTINGS; not the rule's params)")
    p.add_argument("--shards", required=True, help="a shard manifest (.json) or shard paths/patterns")
    p.add_argument("--part", type=int, default=0, help="which of data.filter.parts to filter")
    p.add_argument("--out", required=True)
    p = sub.add_parser("filter-merge")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--parts", nargs="+", help="the parts' result files")
    given.add_argument("--part-pattern", help="the parts' result files as a pattern with {part}, 0 .. --count - 1 "
                                              "(2,000 paths would near the kernel's limit on one command's length)")
    p.add_argument("--count", type=int, help="how many parts --part-pattern names")
    p.add_argument("--out", required=True)
    p = sub.add_parser("evalset")
    p.add_argument("task", choices=tuple(EVAL_DEFAULTS))
    p.add_argument("--data-json", default="{}")
    p.add_argument("--out", required=True)
    p = sub.add_parser("fig8")
    p.add_argument("--shards", required=True)
    p.add_argument("--light", required=True)
    p.add_argument("--heavy", required=True)
    p.add_argument("--out", required=True, help="output prefix (.pdf and .png are written)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from webssl_repro.settings import merge_nested

    data = merge_nested(json.loads(getattr(args, "data_json", "{}") or "{}"),
                        json.loads(getattr(args, "settings_json", "{}") or "{}"))
    shards = getattr(args, "shards", None)
    if shards is not None:
        shards = manifest_shards(shards) if shards.endswith(".json") else expand_sources(shards)
    if args.cmd == "shards":
        res: Any = build_corpus({k: v for k, v in data.items() if k == "shards"} or data.get("corpus", {}),
                                args.out, args.threads)
        res = {k: v for k, v in res.items() if k != "shards"}
    elif args.cmd == "in1k":
        res = build_corpus(data.get("in1k", {}), args.out, args.threads, source="in1k")
        res = {k: v for k, v in res.items() if k != "shards"}
    elif args.cmd in ("filter", "filter-merge"):
        res = (filter_corpus(args.variant, data.get("filter", {}), shards, args.out, args.part)
               if args.cmd == "filter" else filter_merge(merge_parts(args.parts, args.part_pattern, args.count), args.out))
        res = {k: v for k, v in res.items() if k != "shards"}
    elif args.cmd == "evalset":
        res = build_evalset(args.task, data.get("evalsets", {}), args.out)
    else:
        res = fig8_grid(shards, args.light, args.heavy, args.out)
    print(json.dumps(res, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
