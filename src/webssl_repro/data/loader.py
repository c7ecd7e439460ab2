"""One fault-tolerant loader for mini and real data: tar shards or an image folder.

``make_loader`` splits the shard list across ranks and dataloader workers (disjoint and
covering within an epoch; when there are fewer shards than readers it splits samples
instead), repeats reshuffled epochs until a samples-seen budget is met, decodes to PIL, and
skips - counting and warning - unreadable samples and truncated or missing shards: at web
scale a corrupt shard is expected, not fatal. Counts live in ``loader.stats`` of the process
that read them; worker processes report theirs through warnings.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
import torch
from torch.utils.data import IterableDataset, get_worker_info

from webssl_repro.data.shards import IMAGE_EXTS, SHARD_PATTERNS, decode_sample, shard_samples
from webssl_repro.data.workers import JobDataLoader

#: The key of the item a stream made with ``report_stats`` yields last, after its samples: the
#: reader's ``LoaderStats`` as a dict (``reader``: its index over ranks x workers).
STATS_KEY = "__loader_stats__"


@dataclasses.dataclass
class LoaderStats:
    """What the reader had to skip; ``errors`` keeps the first messages for the log."""

    samples: int = 0
    skipped_samples: int = 0
    broken_shards: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def note(self, what: str, exn: BaseException) -> None:
        msg = f"{what}: {type(exn).__name__}: {str(exn)[:200]}"
        if len(self.errors) < 50:
            self.errors.append(msg)
        warnings.warn(f"webssl_repro.data.loader: skipping {msg}", RuntimeWarning, stacklevel=3)


def folder_shards(folder: str) -> list[str]:
    """The shards directly in ``folder``, sorted by name."""
    return sorted({path for pattern in SHARD_PATTERNS for path in glob.glob(os.path.join(folder, pattern))})


def expand_sources(source: str | Sequence[str]) -> list[str]:
    """Brace notation (``shard-{00000..00009}.tar``), '::'-separated lists, a directory of tars, or a list."""
    from webdataset.shardlists import expand_urls

    items = [source] if isinstance(source, str) else list(source)
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            out.extend(folder_shards(item))
        else:
            out.extend(expand_urls(item))
    return out


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _SplitStream(IterableDataset):
    """Common rank/worker split, epoch repetition and budget for a list of items (shards or files).

    Not webdataset's ``split_by_node`` / ``split_by_worker``: those split shards only, so with
    fewer shards than readers (the mini eval sets, a test's two shards on 2 ranks x 2 workers)
    some readers get nothing, and they leave each reader's share of a samples-seen budget and
    the per-epoch reshuffle to the caller."""

    def __init__(self, items: list[str], *, rank: int | None, world_size: int | None, samples: int | None,
                 shuffle_items: bool, shuffle_buffer: int, seed: int, transform: Callable | None,
                 report_stats: bool = False) -> None:
        super().__init__()
        if not items:
            raise ValueError("make_loader: no shards or images found")
        self.items = items
        self.rank, self.world_size = (rank, world_size) if rank is not None and world_size is not None else _dist()
        self.samples, self.shuffle_items, self.shuffle_buffer = samples, shuffle_items, shuffle_buffer
        self.seed, self.transform, self.report_stats = seed, transform, report_stats
        self.stats = LoaderStats()

    def _read(self, items: list[str], share: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        """The samples of ``items`` in order; with ``share`` = (reader, readers), only the samples
        (and the broken shards) whose index is the reader's modulo readers are decoded and
        counted: every reader reads the same items, each decodes and counts its own part."""
        raise NotImplementedError  # subclasses read shards or files

    @staticmethod
    def _mine(index: int, share: tuple[int, int] | None) -> bool:
        return share is None or index % share[1] == share[0]

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _epoch(self, epoch: int, gw: int, total: int) -> Iterator[dict[str, Any]]:
        order = list(self.items)
        if self.shuffle_items:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        if len(order) >= total:
            yield from self._read(order[gw::total])
        else:  # fewer items than readers: everyone reads all, keeps every total-th sample
            yield from self._read(order, share=(gw, total))

    def _shuffled(self, it: Iterator[dict[str, Any]], gw: int) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        rng = np.random.default_rng([self.seed, gw, 7])
        buf: list[dict[str, Any]] = []
        for s in it:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        rng.shuffle(buf)
        yield from buf

    def _stream(self, gw: int, total: int) -> Iterator[dict[str, Any]]:
        quota = None if self.samples is None else self.samples // total + (gw < self.samples % total)
        n, epoch = 0, 0
        while quota is None or n < quota:
            got = 0
            for sample in self._epoch(epoch, gw, total):
                yield sample
                got += 1
                n += 1
                if quota is not None and n >= quota:
                    return
            if quota is None:
                return
            if got == 0:
                warnings.warn(f"webssl_repro.data.loader: reader {gw}/{total} got no samples in an epoch; "
                              f"stopping at {n} of {quota}", RuntimeWarning)
                return
            epoch += 1

    def __iter__(self) -> Iterator[Any]:
        gw, total = self._reader()
        for sample in self._shuffled(self._stream(gw, total), gw):
            self.stats.samples += 1
            yield self.transform(sample) if self.transform else sample
        if self.report_stats:  # this reader's final counts, which a worker process would otherwise keep
            yield {STATS_KEY: {"reader": gw, **dataclasses.asdict(self.stats)}}


def _ignored(url: str, exn: BaseException) -> None:
    """Another reader's broken shard: it counts and reports it."""


class ShardStream(_SplitStream):
    """Samples of webdataset tars as dicts: ``image`` (PIL RGB), ``meta``, optional ``seg``/``depth``."""

    def __init__(self, urls: list[str], *, arrays: bool = False, **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.arrays = arrays

    def _broken(self, url: str, exn: BaseException) -> None:
        self.stats.broken_shards += 1
        self.stats.note(f"broken shard {url}", exn)

    def _read(self, items: list[str], share: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        k = 0
        for i, url in enumerate(items):
            for raw in shard_samples(url, on_broken=self._broken if self._mine(i, share) else _ignored):
                k += 1
                if not self._mine(k - 1, share):
                    continue
                try:
                    yield decode_sample(raw, self.arrays)
                except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
                    self.stats.skipped_samples += 1
                    self.stats.note(f"sample {raw.get('__key__')} of {raw.get('__url__')}", exn)


class ImageFolderStream(_SplitStream):
    """Real images under ``root`` (recursively); the parent folder name is the class label."""

    def __init__(self, root: str, **kw: Any) -> None:
        files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                       if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
        super().__init__(files, **kw)
        self.root = root
        self.classes = sorted({os.path.basename(os.path.dirname(p)) for p in files})

    def _read(self, items: list[str], share: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        for i, path in enumerate(items):
            if not self._mine(i, share):
                continue
            rel = os.path.relpath(path, self.root)
            cls = os.path.basename(os.path.dirname(path))
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")
            except Exception as exn:  # noqa: BLE001
                self.stats.skipped_samples += 1
                self.stats.note(f"image {path}", exn)
                continue
            yield {"__key__": rel, "__url__": path, "image": image,
                   "meta": {"id": rel, "class": cls, "label": self.classes.index(cls)}}


def shard_batches(samples: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of at most ``size`` consecutive samples of one shard (``__url__``): a shard's
    batches are then the same whichever reader reads it and whatever else that reader reads,
    and so are a batched model's numbers (an MLLM's left padding depends on its batch). Items
    without a ``__url__`` (a reader's ``STATS_KEY`` counts, in-memory samples) join the batch
    under way and do not count towards its size."""
    if size < 1:
        raise ValueError(f"shard_batches: size must be >= 1, got {size}")
    batch: list[Any] = []
    url, n = None, 0
    for sample in samples:
        if isinstance(sample, dict) and STATS_KEY in sample:
            batch.append(sample)
            continue
        here = sample.get("__url__") if isinstance(sample, dict) else None
        if batch and (n == size or here != url):
            yield batch
            batch, n = [], 0
        url, n = here, n + 1
        batch.append(sample)
    if batch:
        yield batch


def _as_is(x: Any) -> Any:
    """A loader's collate that leaves items as made; module-level, so that workers started by
    spawn or forkserver (Linux's default from Python 3.14) can unpickle it."""
    return x


class _ShardBatches(IterableDataset):
    """``shard_batches`` of a stream, made where the stream is read (a loader worker)."""

    def __init__(self, stream: "_SplitStream", size: int, collate: Callable[[list[Any]], Any]) -> None:
        self.stream, self.size, self.collate = stream, size, collate

    def __iter__(self) -> Iterator[Any]:
        for batch in shard_batches(self.stream, self.size):
            yield self.collate(batch)


def make_loader(source: str | Sequence[str], *, batch_size: int | None = None, num_workers: int = 0,
                rank: int | None = None, world_size: int | None = None, samples: int | None = None,
                shuffle_shards: bool = True, shuffle_buffer: int = 0, seed: int = 0,
                transform: Callable[[dict[str, Any]], Any] | None = None, collate_fn: Callable | None = None,
                arrays: bool = False, report_stats: bool = False, within_shards: bool = False) -> Iterable[Any]:
    """Iterate samples of shards (paths, URLs, brace patterns, a folder of tars) or an image folder.

    ``samples`` is the total budget over all ranks and workers (None: one pass); ranks
    default to torch.distributed, else RANK/WORLD_SIZE. Without workers and batching the
    stream itself is returned; otherwise a DataLoader (``.stats`` counts this process only;
    ``report_stats``: each reader ends its samples with a ``STATS_KEY`` item of its counts).
    ``within_shards``: no batch spans two shards (``shard_batches``); with no more readers than
    shards and no ``samples`` budget each reader reads whole shards, so a shard's batches are the
    same for any number of workers.
    """
    kw = dict(rank=rank, world_size=world_size, samples=samples, shuffle_items=shuffle_shards,
              shuffle_buffer=shuffle_buffer, seed=seed, transform=transform, report_stats=report_stats)
    is_folder = isinstance(source, str) and os.path.isdir(source) and not folder_shards(source)
    stream: _SplitStream = ImageFolderStream(source, **kw) if is_folder else ShardStream(
        expand_sources(source), arrays=arrays, **kw)
    if num_workers == 0 and batch_size is None and not within_shards:
        return stream
    dataset: IterableDataset = stream
    if within_shards:  # the stream's batches made by the dataset itself, each reader's from its shards
        if batch_size is None or is_folder or shuffle_buffer:
            raise ValueError("make_loader(within_shards=True) batches the samples of tar shards read in order: "
                             f"it needs a batch_size, shards and no shuffle_buffer (got {batch_size}, "
                             f"{'a folder' if is_folder else 'shards'}, {shuffle_buffer})")
        dataset, batch_size, collate_fn = _ShardBatches(stream, batch_size, collate_fn or _as_is), None, _as_is
    loader = JobDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                           collate_fn=collate_fn if collate_fn is not None else (None if batch_size else _as_is))
    loader.stats = stream.stats  # type: ignore[attr-defined]
    return loader
