"""webdataset tar shards: reading one shard's samples, decoding them, and writing shards.

Writing is one function per shard (``write_shard``) so a workflow can build shards in
parallel and rebuild exactly one; bytes depend only on (seed, start, count, cfg), because
tar headers get a fixed mtime and images are encoded deterministically. Reading one shard
(``shard_samples``) groups members into samples as webdataset does and ends a truncated or
unreadable shard at its last whole sample; ``data.loader`` streams many shards across ranks.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from webssl_repro.data.miniweb import MiniWebConfig, generate
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
