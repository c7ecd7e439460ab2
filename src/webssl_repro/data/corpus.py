"""Pretraining batches addressed by global sample index, for exact resume and DDP.

The training loop asks for "the batch of global samples [s·G + r·L, s·G + (r+1)·L)"
(``webssl_repro.train.loop``). ``IndexedCorpus`` answers that for a local shard corpus:
sample ``i`` is image ``perm_e[i mod N]`` of epoch ``e = i div N`` with a permutation
seeded by (seed, e), and its augmentation is seeded by (seed, i) — so a batch depends on
nothing but its indices, whichever rank, worker or resumed process builds it. Filtered
runs (light / heavy) index only their kept ids and reach their samples-seen budget with
more epochs over the subset, as in the paper.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

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
    base = Path(path).parent
    manifest["shards"] = [s if "://" in s or Path(s).is_absolute() else str(base / s) for s in manifest["shards"]]
    return manifest


def read_kept_ids(path: str | Path) -> set[str]:
    with open(path) as f:
        stats = json.load(f)
    if "kept_ids" not in stats:
        raise ValueError(f"filter output {path} has no 'kept_ids'")
    return set(stats["kept_ids"])


@dataclass
class _Item:
    key: str
    image: bytes
    caption: str


class IndexedCorpus:
    """All samples of a set of local shards (images kept encoded), optionally filtered by id."""

    def __init__(self, shards: Sequence[str], keep_ids: Optional[set[str]] = None, seed: int = 0) -> None:
        from webssl_repro.data.shards import make_loader

        self.seed = seed
        items: list[_Item] = []
        stream = make_loader(list(shards), shuffle_shards=False, rank=0, world_size=1)  # every rank indexes it all
        for sample in stream:
            meta = sample.get("meta") or {}
            key = str(meta.get("id", sample["__key__"]))
            if keep_ids is not None and key not in keep_ids:
                continue
            buf = io.BytesIO()
            sample["image"].save(buf, format="PNG")
            items.append(_Item(key, buf.getvalue(), str(meta.get("caption", ""))))
        if not items:
            raise ValueError(f"no samples left in {len(shards)} shard(s)"
                             + (f" after keeping {len(keep_ids)} filtered ids" if keep_ids is not None else ""))
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

    def sample(self, sample: int) -> tuple[Image.Image, dict]:
        item = self.items[self.item_index(sample)]
        image = Image.open(io.BytesIO(item.image)).convert("RGB")
        return image, {"id": item.key, "caption": item.caption, "index": sample}

    def batches(self, start_sample: int, rank: int, world_size: int, global_batch: int,
                sample_fn: SampleFn, collate_fn: CollateFn) -> Iterator[Any]:
        """This rank's batches from ``start_sample`` on (the training loop's data interface)."""
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        local = global_batch // world_size
        step_start = start_sample
        while True:
            first = step_start + rank * local
            samples = []
            for i in range(first, first + local):
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]))
                image, meta = self.sample(i)
                samples.append(sample_fn(image, meta, gen))
            batch_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, first, 1]).generate_state(1)[0]))
            yield collate_fn(samples, batch_gen)
            step_start += global_batch
