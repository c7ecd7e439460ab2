"""webdataset shards of the mini-web, and one fault-tolerant loader for mini and real data.

Writing is one function per shard (``write_shard``) so a workflow can build shards in
parallel and rebuild exactly one; bytes depend only on (seed, start, count, cfg), because
tar headers get a fixed mtime and images are encoded deterministically.

Reading (``make_loader``) splits the shard list across ranks and dataloader workers
(disjoint and covering within an epoch; when there are fewer shards than readers it splits
samples instead), repeats reshuffled epochs until a samples-seen budget is met, decodes to
PIL, and skips - counting and warning - unreadable samples and truncated or missing shards:
at web scale a corrupt shard is expected, not fatal. Counts live in ``loader.stats`` of the
process that read them; worker processes report theirs through warnings.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
import torch
from torch.utils.data import IterableDataset, get_worker_info

from webssl_repro.data.miniweb import MiniWebConfig, generate
from webssl_repro.data.workers import JobDataLoader
from webssl_repro.files import atomic_save, atomic_write

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_local(url: str) -> bool:
    """A file path, not a URL (``s3://``, ``https://``) or a webdataset ``pipe:`` command."""
    return "://" not in url and not url.startswith("pipe:")


#: leading bytes of the compressions tarfile reads (gzip, bzip2, xz)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
#: the shard files of a folder given as a source: tars, plain or compressed (read by ``open_shard``)
SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tar.xz")


def is_compressed(path: str) -> bool:
    """Whether a local shard is a compressed tar (``.tar.gz`` and the like), by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def open_shard(url: str):
    """A tar of ``url`` for one forward pass: a local file, or webdataset's ``gopen`` stream."""
    import tarfile

    if is_local(url):
        return tarfile.open(url, "r|*")
    from webdataset.gopen import gopen

    return tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")


def _warn_broken(url: str, exn: BaseException) -> None:
    warnings.warn(f"webssl_repro.data.shards: {url}: {type(exn).__name__}: {exn}; reading it up to its last "
                  "whole sample", RuntimeWarning, stacklevel=3)


def _sample_members(tf) -> Iterator[tuple[int, str, str, Any]]:
    """``(index, key, suffix, member)`` of each tar member that belongs to a sample, with the
    sample's position in the tar: webdataset's grouping (OpenCLIP's ``group_by_keys_nothrow``).
    A new key starts a sample; so does a suffix the sample already has (a tar that repeats a
    key), which would otherwise overwrite the earlier sample's member. One rule for reading a
    shard and for copying the samples a filter kept out of it (``write_selected_shard``)."""
    from webdataset.tariterators import base_plus_ext

    index, current, suffixes = -1, None, set()
    for member in tf:
        if not member.isreg():
            continue
        key, suffix = base_plus_ext(member.name)
        if key is None or os.path.basename(member.name).startswith("__"):
            continue
        suffix = suffix.lower()
        if key != current or suffix in suffixes:
            index, current, suffixes = index + 1, key, set()
        suffixes.add(suffix)
        yield index, key, suffix, member


def shard_samples(url: str, with_data: bool = True,
                  on_broken: Callable[[str, BaseException], None] = _warn_broken) -> Iterator[dict[str, Any]]:
    """The samples of one tar, members grouped by key as webdataset groups them, each with its
    position in the tar (``__index__``: a repeated key is two samples); members' bytes only
    ``with_data`` (else each value is None: counting a local shard reads its headers alone, and
    counts what reading it yields).

    A truncated or unreadable shard ends at its last whole sample and is reported once to
    ``on_broken``. A local tar cut at a member boundary reads as a whole shorter tar but lacks
    the zero block that ends an archive: its last sample, which may have lost members, is
    dropped and reported likewise (half a sample is not a sample). A stream cannot be checked
    so: a remote shard cut at a member boundary reads as whole, as webdataset reads it."""
    import tarfile

    sample: dict[str, Any] = {}
    try:
        if is_local(url) and not is_compressed(url):  # seekable: counting reads the headers alone
            tf, size = tarfile.open(url, "r:"), os.path.getsize(url)
        else:  # a stream, as webdataset reads it: a compressed local shard too
            tf, size = open_shard(url), None
        with tf:
            for index, key, suffix, member in _sample_members(tf):
                if sample and sample["__index__"] != index:
                    yield sample
                    sample = {}
                if size is not None and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                if not sample:
                    sample = {"__key__": key, "__url__": url, "__index__": index}
                sample[suffix] = tf.extractfile(member).read() if with_data else None
            if size is not None and not _ends_archive(tf):
                raise tarfile.ReadError(f"no end-of-archive block after {sample.get('__key__', 'its last member')}: "
                                        "cut off at a member boundary")
    except (tarfile.TarError, OSError, EOFError) as exn:
        on_broken(url, exn)
        return
    if sample:
        yield sample


def _ends_archive(tf) -> bool:
    """Whether a local tar read to its end has the zero block that ends an archive where its
    reading stopped (``tf.offset``), as tar writers put (two, then padding)."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(512)
    return len(block) == 512 and not block.strip(b"\0")


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, count) of each shard covering indices [0, n_images)."""
    return [(s, min(shard_size, n_images - s)) for s in range(0, n_images, shard_size)]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_shard(out_path: str, seed: int, start: int, count: int, cfg: MiniWebConfig | dict | None = None, *,
                image_format: str = "jpg", with_arrays: bool = False, quality: int = 90,
                kind: str | None = None) -> dict[str, Any]:
    """Write images ``start .. start+count-1`` of world ``seed`` as one tar; returns a summary.

    Entries per sample: ``<key>.jpg|png``, ``<key>.json`` (the metadata) and, with
    ``with_arrays``, ``<key>.seg.npy`` (uint8 class ids) and ``<key>.depth.npy`` (float32 m).
    The file appears atomically so an interrupted job never leaves a valid-looking shard.
    """
    import webdataset as wds

    from webssl_repro.data.evalsets import check_train_seed

    check_train_seed(seed)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"write_shard: image_format must be 'jpg' or 'png', got {image_format!r}")
    cfg = cfg if isinstance(cfg, MiniWebConfig) else MiniWebConfig.from_dict(cfg)
    kinds: dict[str, int] = {}
    flags = {"has_text": 0, "is_chart_table_doc": 0}

    def write(fh) -> None:
        writer = wds.TarWriter(fh, encoder=False, mtime=0.0)
        for index in range(start, start + count):
            s = generate(seed, index, cfg, kind=kind)
            entry = {"__key__": s.meta["id"], image_format: s.encode_image(image_format, quality),
                     "json": json.dumps(s.meta, sort_keys=True).encode()}
            if with_arrays:
                entry["seg.npy"] = npy_bytes(s.seg)
                entry["depth.npy"] = npy_bytes(s.depth.astype(np.float32))
            writer.write(entry)
            kinds[s.meta["kind"]] = kinds.get(s.meta["kind"], 0) + 1
            for flag in flags:
                flags[flag] += s.meta[flag]
        writer.close()

    atomic_write(out_path, write)
    return {"path": out_path, "seed": seed, "start": start, "count": count, "kinds": kinds, **flags}


def write_selected_shard(src: str, keep: Iterable[tuple[str, int]], out_path: str) -> dict[str, Any]:
    """Copy the members of the kept samples of one tar (``(__key__, __index__)`` as
    ``shard_samples`` reads them: a key the tar repeats names two samples), byte for byte and
    in order, into one tar: the light / heavy corpora as shards of their own, as DataComp
    reshards a filtered pool. An unreadable or truncated source tar contributes what can be
    read and is counted."""
    import tarfile

    keep = {(str(key), int(index)) for key, index in keep}
    copied: set[tuple[str, int]] = set()
    broken: list[str] = []

    def save(tmp) -> None:
        with tarfile.open(tmp, "w") as out:
            try:
                with open_shard(src) as tf:
                    for index, key, _, member in _sample_members(tf):
                        if (key, index) in keep:
                            data = tf.extractfile(member).read()
                            new = tarfile.TarInfo(member.name)
                            new.size, new.mtime, new.mode = len(data), 0, 0o444
                            out.addfile(new, io.BytesIO(data))
                            copied.add((key, index))
            except (tarfile.TarError, OSError, EOFError) as exn:
                broken.append(src)
                warnings.warn(f"write_selected_shard: {src}: {exn}", RuntimeWarning)

    atomic_save(out_path, save)
    return {"path": out_path, "count": len(copied), "broken_shards": len(broken)}


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
        warnings.warn(f"webssl_repro.data.shards: skipping {msg}", RuntimeWarning, stacklevel=3)


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
                warnings.warn(f"webssl_repro.data.shards: reader {gw}/{total} got no samples in an epoch; "
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


def sample_id(sample: dict[str, Any]) -> str:
    """A decoded sample's id: its json's ``id`` (mini-web), else its webdataset key."""
    return str((sample.get("meta") or {}).get("id", sample.get("__key__")))


def decode_text(raw: dict[str, Any]) -> dict[str, Any]:
    """A sample's ``meta`` (the json) and ``txt``, without its image: enough to read its
    id and alt-texts (``corpus.captions_of``) before paying for a decode."""
    out = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__"), "__index__": raw.get("__index__", 0),
           "meta": json.loads(raw["json"]) if "json" in raw else {"id": raw.get("__key__")}}
    if raw.get("txt"):  # an alt-text stored beside the image (img2dataset's caption column)
        out["txt"] = raw["txt"].decode("utf-8", errors="replace").strip()
    return out


def decode_image(raw: dict[str, Any]) -> Image.Image:
    """A sample's image member (the first of ``IMAGE_EXTS``) as PIL RGB."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw.get('__key__')} has no image (keys {sorted(k for k in raw if k[0] != '_')})")
    img = Image.open(io.BytesIO(raw[ext]))
    img.load()
    return img.convert("RGB")


def decode_sample(raw: dict[str, Any], arrays: bool = False) -> dict[str, Any]:
    """A sample's tar members (bytes by extension) as ``image`` (PIL RGB), ``meta`` (the json),
    ``txt`` and, with ``arrays``, ``seg`` / ``depth``."""
    out = {**decode_text(raw), "image": decode_image(raw)}
    if arrays:
        for name in ("seg", "depth"):
            if f"{name}.npy" in raw:
                out[name] = np.load(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False)
    return out


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

