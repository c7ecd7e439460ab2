"""Evaluation sets drawn from held-out seeds of the mini-web world.

Pretraining corpora use seeds below ``EVAL_SEED_BASE``; every (task, split) of an eval set
has its own seed at or above it, so no eval image can occur in a pretraining shard and the
train/val/test splits of one task are disjoint. Tasks: the classic-vision analogues
(classification = IN-1k, segmentation = ADE20K, depth = NYUd), image-caption pairs for
alignment (WIT-1024), and the 16 VQA analogues of ``webssl_repro.metrics.VQA_BENCHMARKS``.
"""
from __future__ import annotations

import io
import json
from typing import Any, Iterator


from webssl_repro.files import atomic_write
from webssl_repro.data.shards import npy_bytes
from webssl_repro.data.miniweb import MiniWebConfig, generate, render, rng_for, sample_spec
from webssl_repro.data.vqa_questions import BENCHMARK_KINDS, GENERATORS
from webssl_repro.metrics import VQA_BENCHMARKS, VQA_CATEGORIES

EVAL_SEED_BASE = 1_000_000
SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSIC_TASKS: tuple[str, ...] = ("classification", "segmentation", "depth", "alignment")
TASKS: tuple[str, ...] = (*CLASSIC_TASKS, *VQA_BENCHMARKS)
ALIGNMENT_PAIRS = 1024
SCENE_KINDS = {"objects": 0.5, "text_scene": 0.5}


def eval_seed(task: str, split: str, base: int = 0) -> int:
    """The world seed of one (task, split); ``base`` selects an independent redraw of all sets."""
    if task not in TASKS or split not in SPLITS:
        raise KeyError(f"eval_seed: unknown task {task!r} or split {split!r}")
    return EVAL_SEED_BASE + 10_000 * int(base) + 10 * TASKS.index(task) + SPLITS.index(split)


def check_train_seed(seed: int) -> int:
    if not 0 <= int(seed) < EVAL_SEED_BASE:
        raise ValueError(f"pretraining seed {seed} must lie in [0, {EVAL_SEED_BASE}): larger seeds are eval sets")
    return int(seed)


def _task_cfg(task: str, size: int) -> MiniWebConfig:
    if task == "classification":
        return MiniWebConfig(size=size, source="in1k")
    if task in ("segmentation", "depth"):
        return MiniWebConfig(size=size, kinds=SCENE_KINDS)
    return MiniWebConfig(size=size)


def classic_items(task: str, split: str, n: int, size: int = 64, base: int = 0) -> Iterator[dict[str, Any]]:
    """Images with the target of ``task``: ``label`` (class id), ``seg``, ``depth`` or ``caption``."""
    if task not in CLASSIC_TASKS:
        raise KeyError(f"classic_items: {task!r} is not one of {CLASSIC_TASKS}")
    seed, cfg = eval_seed(task, split, base), _task_cfg(task, size)
    for index in range(n):
        s = generate(seed, index, cfg)
        item: dict[str, Any] = {"id": s.meta["id"], "image": s.image, "meta": s.meta}
        if task == "classification":
            item["label"] = s.meta["label"]
        elif task == "segmentation":
            item["seg"] = s.seg
        elif task == "depth":
            item["depth"] = s.depth
        else:
            item["caption"] = s.meta["caption"]
        yield item


def vqa_draw(benchmark: str, seed: int, index: int, cfg: MiniWebConfig) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(question, spec of its image) for world image ``index``: the generator may pose a question
    about a variant of the drawn image (MMVP's turned twin), which then comes with its own spec."""
    spec = sample_spec(seed, index, cfg, kind=BENCHMARK_KINDS[benchmark])
    questions = GENERATORS[benchmark](spec, rng_for(seed, index, "q:" + benchmark))
    return [(q, q.pop("spec", spec)) for q in questions]


def vqa_items(benchmark: str, split: str, n: int, size: int = 64, base: int = 0) -> list[dict[str, Any]]:
    """``n`` questions (MME and MMVP come in pairs, so a pair is never cut) with their images."""
    if benchmark not in GENERATORS:
        raise KeyError(f"vqa_items: unknown benchmark {benchmark!r}")
    seed, cfg = eval_seed(benchmark, split, base), MiniWebConfig(size=size)
    items: list[dict[str, Any]] = []
    index = 0
    while len(items) < n:
        if index > 50 * n + 1000:
            raise RuntimeError(f"vqa_items: {benchmark} found only {len(items)} of {n} questions")
        for q, s in vqa_draw(benchmark, seed, index, cfg):
            image, _, _ = render(s, size, cfg.noise)
            items.append(dict(q, id=f"{benchmark}-{split}-{len(items):06d}", benchmark=benchmark, split=split,
                              image_id=s["id"], category=_category(benchmark), image=image))
        index += 1
    return items


def _category(benchmark: str) -> str:
    return next(c for c, group in VQA_CATEGORIES.items() if benchmark in group)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_evalset(out_path: str, task: str, split: str, n: int, size: int = 64, base: int = 0) -> dict[str, Any]:
    """One webdataset tar per (task, split); VQA tars hold png + json (question, answer, choices ...)."""
    import webdataset as wds

    written: list[str] = []

    def write(fh) -> None:
        writer = wds.TarWriter(fh, encoder=False, mtime=0.0)
        items = classic_items(task, split, n, size, base) if task in CLASSIC_TASKS else vqa_items(task, split, n, size, base)
        for item in items:
            meta = {k: v for k, v in item.items() if k not in ("image", "seg", "depth")}
            entry = {"__key__": item["id"], "png": _png(item["image"]), "json": json.dumps(meta, sort_keys=True).encode()}
            for name in ("seg", "depth"):
                if name in item:
                    entry[f"{name}.npy"] = npy_bytes(item[name])
            writer.write(entry)
            written.append(item["id"])
        writer.close()

    atomic_write(out_path, write)
    return {"path": out_path, "task": task, "split": split, "count": len(written), "seed": eval_seed(task, split, base)}


def load_evalset(path: str) -> list[dict[str, Any]]:
    """All records of one eval tar in order: ``image`` (PIL) and the json fields (+ seg/depth)."""
    from webssl_repro.data.loader import make_loader

    out = []
    loader = make_loader(path, shuffle_shards=False, arrays=True, rank=0, world_size=1)
    for s in loader:
        rec = dict(s["meta"], image=s["image"])
        for name in ("seg", "depth"):
            if name in s:
                rec[name] = s[name]
        out.append(rec)
    bad = loader.stats.skipped_samples + loader.stats.broken_shards
    if bad:  # a training loader skips such samples; a score over part of an eval set is another score
        raise ValueError(f"{path}: {loader.stats.skipped_samples} sample(s) do not decode and "
                         f"{loader.stats.broken_shards} shard(s) cannot be read (first: {loader.stats.errors[0]}); "
                         "an eval set is scored whole: rebuild it")
    return out

