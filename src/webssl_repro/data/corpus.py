"""Pretraining batches addressed by global sample index, for exact resume and DDP.

The training loop asks for "the batch of global samples [s·G + r·L, s·G + (r+1)·L)"
(``webssl_repro.train.loop``). ``IndexedCorpus`` answers that for a local shard corpus:
sample ``i`` is image ``perm_e[i mod N]`` of epoch ``e = i div N`` with a permutation
seeded by (seed, e), and its augmentation is seeded by (seed, i) — so a batch depends on
nothing but its indices, whichever rank, worker or resumed process builds it. Filtered
runs (light / heavy) read the filter's shards of kept samples and reach their samples-seen
budget with more epochs over the subset, as in the paper. It holds every image in memory,
decoded up to ``MAX_DECODED_BYTES`` and PNG-encoded beyond, so it serves corpora of up to some
millions of images; ``data.stream_corpus.ShardCorpus`` streams the billions of MC-2B with the
same batch interface. Dataloader workers build batches ahead of the trainer: worker ``i`` of
``n`` makes a rank's batches ``i, i + n, ...``, which depend on their indices alone.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

#: Decoded pixels kept per process before images are kept PNG-encoded instead: a 64 px PNG
#: costs ~0.3 ms to decode at each visit, as much as a mini DINO sample's six crops.
MAX_DECODED_BYTES = 1 << 30

SampleFn = Callable[[Image.Image, dict, torch.Generator], Any]
CollateFn = Callable[[list, torch.Generator], Any]


def read_manifest(path: str | Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read data manifest {path}: {err}") from err
    if "shards" not in manifest:
        raise ValueError(f"data manifest {path} has no 'shards' list")
    from webssl_repro.data.shards import is_local

    base = Path(path).parent  # relative shard paths are relative to the manifest
    manifest["shards"] = [str(base / s) if is_local(s) and not Path(s).is_absolute() else s
                          for s in manifest["shards"]]
    return manifest


def captions_of(sample: dict[str, Any]) -> tuple[str, ...]:
    """The alt-texts of a decoded sample: the json's ``caption``, MetaCLIP's ``texts``
    (``[[source, text, ...], ...]`` or plain strings) or a ``.txt`` member, in that order."""
    meta = sample.get("meta") or {}
    if meta.get("caption"):
        return (str(meta["caption"]),)
    texts = [t[1] if isinstance(t, (list, tuple)) else t for t in meta.get("texts") or ()]
    texts = [str(t) for t in texts if t]
    if texts:
        return tuple(texts)
    return (sample["txt"],) if sample.get("txt") else ()


def derived_seed(*parts: int) -> int:
    """A seed that depends on ``parts`` alone (the run's seed, a sample index, a stream id)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def pick_caption(captions: Sequence[str], seed: int, index: int) -> str:
    """One alt-text per visit of sample ``index`` (MetaCLIP draws one of a sample's texts each
    time it is seen); '' when there is none."""
    if len(captions) <= 1:
        return captions[0] if captions else ""
    return captions[derived_seed(seed, index, 2) % len(captions)]


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The augmentation generator of global sample ``index``: the same on every rank and resume."""
    return torch.Generator().manual_seed(derived_seed(seed, index))


def assemble_batch(seed: int, first: int, samples: Iterable[tuple[Image.Image, dict]],
                   sample_fn: SampleFn, collate_fn: CollateFn) -> Any:
    """The batch whose first global sample is ``first``: each (image, meta) augmented by its
    own generator, the batch-level draws (masks) by one seeded with (seed, first)."""
    out = [sample_fn(image, meta, sample_generator(seed, first + k)) for k, (image, meta) in enumerate(samples)]
    batch_gen = torch.Generator().manual_seed(derived_seed(seed, first, 1))
    return collate_fn(out, batch_gen)


def local_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    return global_batch // world_size


@dataclass
class _Item:
    key: str
    image: bytes | np.ndarray  # PNG, or RGB uint8 pixels (H,W,3)
    captions: tuple[str, ...]


class IndexedCorpus:
    """All samples of a set of local shards. ``needs_caption`` (CLIP) leaves out samples without
    an alt-text, as OpenCLIP's loader does, counted in ``uncaptioned``. An image is kept decoded
    where its pixels fit in what is left of ``max_decoded_bytes`` (``decoded_bytes`` counts the
    pixels kept), otherwise as PNG: either is the same image."""

    def __init__(self, shards: Sequence[str], seed: int = 0, needs_caption: bool = False, workers: int = 0,
                 max_decoded_bytes: int = MAX_DECODED_BYTES) -> None:
        from webssl_repro.data.shards import sample_id
        from webssl_repro.data.loader import make_loader

        if workers < 0:
            raise ValueError(f"IndexedCorpus: workers must be >= 0, got {workers}")
        self.seed, self.workers = seed, int(workers)
        items: list[_Item] = []
        self.uncaptioned, self.decoded_bytes = 0, 0
        stream = make_loader(list(shards), shuffle_shards=False, rank=0, world_size=1)  # every rank indexes it all
        for sample in stream:
            captions = captions_of(sample)
            if needs_caption and not captions:
                self.uncaptioned += 1
                continue
            image = sample["image"]  # decode_sample gives RGB
            size = image.width * image.height * 3
            if self.decoded_bytes + size <= max_decoded_bytes:
                pixels = np.asarray(image)
                pixels.setflags(write=False)
                self.decoded_bytes += size
                items.append(_Item(sample_id(sample), pixels, captions))
            else:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                items.append(_Item(sample_id(sample), buf.getvalue(), captions))
        if self.uncaptioned:
            warnings.warn(f"IndexedCorpus: {self.uncaptioned} sample(s) without an alt-text left out", RuntimeWarning)
        if not items:
            raise ValueError(f"no samples in {len(shards)} shard(s)"
                             + (f" ({self.uncaptioned} without an alt-text)" if self.uncaptioned else ""))
        self.items = items
        self.stats = getattr(stream, "stats", None)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def item_index(self, sample: int) -> int:
        epoch, pos = divmod(sample, len(self.items))
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
            self._perms = {epoch: perm}  # one epoch at a time: indices are requested in order
        return int(perm[pos])

    def caption_texts(self) -> Iterator[str]:
        """Every alt-text of the corpus (a mini tokenizer is learned from them)."""
        return (text for item in self.items for text in item.captions)

    def sample(self, sample: int) -> tuple[Image.Image, dict]:
        item = self.items[self.item_index(sample)]
        if isinstance(item.image, np.ndarray):
            image = Image.fromarray(item.image)
        else:
            image = Image.open(io.BytesIO(item.image))  # saved from RGB above
            image.load()
        return image, {"id": item.key, "caption": pick_caption(item.captions, self.seed, sample), "index": sample}

    def check_resume(self, start_sample: int, trained_world_size: int, world_size: int) -> None:
        """Any number of ranks resumes: sample ``i`` is the ``i``-th of one global order."""

    def batches(self, start_sample: int, rank: int, world_size: int, global_batch: int,
                sample_fn: SampleFn, collate_fn: CollateFn) -> Iterator[Any]:
        """This rank's batches from ``start_sample`` on (the training loop's data interface),
        made by ``workers`` dataloader processes (0: this process)."""
        from webssl_repro.data.workers import worker_batches

        local = local_batch_size(global_batch, world_size)
        dataset = _IndexedBatches(self, start_sample, rank * local, global_batch, local, sample_fn, collate_fn)
        return worker_batches(dataset, self.workers, self.seed)

    def batch(self, first: int, size: int, sample_fn: SampleFn, collate_fn: CollateFn) -> Any:
        """The batch of global samples ``first .. first + size - 1``."""
        return assemble_batch(self.seed, first, (self.sample(i) for i in range(first, first + size)),
                              sample_fn, collate_fn)


class _IndexedBatches(IterableDataset):
    """A rank's batches of an ``IndexedCorpus`` from ``start`` on; in dataloader worker ``i`` of
    ``n``, its batches ``i, i + n, ...``."""

    def __init__(self, corpus: IndexedCorpus, start: int, offset: int, global_batch: int, local: int,
                 sample_fn: SampleFn, collate_fn: CollateFn) -> None:
        super().__init__()
        self.corpus, self.start, self.offset, self.global_batch, self.local = corpus, start, offset, global_batch, local
        self.sample_fn, self.collate_fn = sample_fn, collate_fn

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            yield self.corpus.batch(self.start + k * self.global_batch + self.offset, self.local,
                                    self.sample_fn, self.collate_fn)
            k += n
