"""Pretraining batches streamed from webdataset shards, in bounded memory (MC-2B scale).

``IndexedCorpus`` holds every image; 2B images do not fit. ``ShardCorpus`` reads shards as
webdataset pipelines do: each reader (a rank's dataloader worker) takes its share of a
per-epoch shard permutation and emits each shard's samples in a seeded random order, so a
reader holds one encoded shard at a time (two while filling the places of a shard none of
whose images decodes). Batch ``k`` of a rank is made by its reader
``k mod workers`` from that reader's stream, whose position is therefore known from the
step alone: a resumed run skips the samples already consumed by counting tar headers
(no decoding, and whole shards by their headers only) and continues with exactly the
batches an uninterrupted run would have seen, augmentation seeded by global sample index
as in ``IndexedCorpus``. Unlike ``IndexedCorpus``, the order depends on the number of ranks
and workers (as DINOv2's sharded sampler and webdataset's shard split do). A rank's local
batch is consecutive samples of one reader's shard, shuffled within the shard but with no
buffer across shards (webdataset's ``shuffle(n)``); and as readers' shares of an epoch differ
in length, an epoch's last batches repeat some samples and miss as many, as a sharded stream does.

What the readers pass over (undecodable samples, CLIP's samples without an alt-text, shards none
of whose samples decodes) is warned about and, given a ``record_dir``, written there by each
reader process: a run's readers live in dataloader workers on every node and across resumes,
and ``ShardCorpus.stats`` counts the distinct samples and shards over all of them for the run's
provenance (a sample read again after a resume counts once; one passed over in batches prefetched
past the run's last step counts too).
"""
from __future__ import annotations

import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from webssl_repro.data.corpus import (
    CollateFn,
    SampleFn,
    assemble_batch,
    captions_of,
    local_batch_size,
    pick_caption,
)
from webssl_repro.data.shards import shard_samples
from webssl_repro.data.loader import LoaderStats
from webssl_repro.data.workers import worker_batches


def count_samples(url: str) -> int:
    return sum(1 for _ in shard_samples(url, with_data=False))


#: the key of a record that stands for a broken shard (a truncated or unreadable tar, as the
#: in-memory corpus counts them); no sample has an empty key
WHOLE_SHARD = ""
#: why a CLIP sample is passed over without being decoded (counted apart, as ``IndexedCorpus.uncaptioned``)
NO_ALT_TEXT = "has no alt-text for CLIP"


def _field(text: Any) -> str:
    return " ".join(str(text).split())  # one line, no tabs: a record is ``url<TAB>key<TAB>position<TAB>why``


def passed_over(record_dir: str | Path) -> tuple[LoaderStats, int]:
    """What the readers recorded in ``record_dir``: the distinct samples passed over (not
    decodable), broken shards and their first reasons, by shard (``LoaderStats``, as the
    in-memory corpus counts them); and the distinct CLIP samples without an alt-text."""
    seen: dict[tuple[str, str, str], str] = {}
    legacy: dict[tuple[str, str], str] = {}  # recorded before positions were: ``url<TAB>key<TAB>why``
    for path in sorted(Path(record_dir).glob("*.tsv")):
        for line in path.read_text().splitlines():
            fields = line.split("\t", 3)
            if len(fields) < 4:
                url, key, why = (fields + ["", ""])[:3]
                if key == WHOLE_SHARD:  # a shard's record has no position in either form
                    seen.setdefault((url, key, ""), why)
                else:
                    legacy.setdefault((url, key), why)
                continue
            url, key, index, why = fields
            seen.setdefault((url, key, index), why)
    # a run resumed across the change records its old bad samples again, with their positions
    positioned = {(url, key) for url, key, _ in seen}
    for (url, key), why in legacy.items():
        if (url, key) not in positioned:
            seen[(url, key, "")] = why
    uncaptioned = sum(1 for why in seen.values() if why == NO_ALT_TEXT)
    shards = sum(1 for _, key, _ in seen if key == WHOLE_SHARD)
    errors = [f"{url}" + (f" {key}" if key else "") + f": {why[:200]}"
              for (url, key, _), why in sorted(seen.items()) if why != NO_ALT_TEXT][:50]
    return LoaderStats(skipped_samples=len(seen) - shards - uncaptioned, broken_shards=shards,
                       errors=errors), uncaptioned


class ShardCorpus:
    """The ``batches`` interface of ``IndexedCorpus`` over shards streamed per reader."""

    def __init__(self, shards: Sequence[str], seed: int = 0, workers: int = 0, needs_caption: bool = False,
                 record_dir: Optional[str | Path] = None) -> None:
        if not shards:
            raise ValueError("ShardCorpus: no shards")
        if workers < 0:
            raise ValueError(f"ShardCorpus: workers must be >= 0, got {workers}")
        self.shards, self.seed, self.workers = list(shards), int(seed), int(workers)
        #: CLIP: a sample without an alt-text takes an undecodable one's way (the next that has one)
        self.needs_caption = bool(needs_caption)
        #: where each reader process records what it passes over (``passed_over``); None: warnings only
        self.record_dir = None if record_dir is None else Path(record_dir)
        self._counts: dict[str, int] = {}
        #: (url, key, position) this process recorded, and its record file: a bad sample is tried again from
        #: every earlier place of its shard followed only by bad ones, but written once
        self._recorded: set[tuple[str, str, str]] = set()
        self._record_file: Optional[tuple[int, Path]] = None

    @property
    def stats(self) -> Optional[LoaderStats]:
        """What this run's readers passed over, on every rank and in every attempt (``record_dir``)."""
        return None if self.record_dir is None else passed_over(self.record_dir)[0]

    @property
    def uncaptioned(self) -> int:
        """CLIP samples without an alt-text the readers passed over (``record_dir``; 0 without one)."""
        return 0 if self.record_dir is None else passed_over(self.record_dir)[1]

    def _passed_over(self, url: Any, key: Any, why: str, stacklevel: int = 3, index: Any = "") -> None:
        """Warn (at the reader's line), and record where ``record_dir`` says, that ``key`` of
        shard ``url`` is passed over; ``index`` is its position in the tar (``__index__``), as a
        tar that repeats a key holds two samples."""
        what = f"{url}: {why}" if key == WHOLE_SHARD else f"sample {key} of {url}: {why}"
        warnings.warn(f"webssl_repro.data.stream_corpus: {what}", RuntimeWarning, stacklevel=stacklevel)
        entry = (_field(url), _field(key), _field(index))
        if self.record_dir is None or entry in self._recorded:
            return
        if self._record_file is None or self._record_file[0] != os.getpid():  # a new reader process
            self.record_dir.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tsv"  # on any node, in any container
            self._record_file = (os.getpid(), self.record_dir / name)
        with open(self._record_file[1], "a") as fh:
            fh.write("\t".join([*entry, _field(why)]) + "\n")
        self._recorded.add(entry)

    def _sample_passed_over(self, raw: dict[str, Any], why: str) -> None:
        """``_passed_over`` for a raw sample: its shard, key and position in the tar."""
        self._passed_over(raw.get("__url__"), raw.get("__key__"), why, stacklevel=4, index=raw.get("__index__", ""))

    def reader_shards(self, epoch: int, reader: int, readers: int) -> list[int]:
        """Reader ``reader``'s shards (indices) in ``epoch``: every ``readers``-th of a seeded permutation."""
        if len(self.shards) < readers:
            raise ValueError(f"ShardCorpus: {len(self.shards)} shard(s) for {readers} readers (ranks x "
                             "pretrain.loader.workers); every reader needs at least one shard")
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in order[reader::readers]]

    def count(self, url: str) -> int:
        if url not in self._counts:
            self._counts[url] = count_samples(url)
        return self._counts[url]

    def reader_stream(self, reader: int, readers: int, skip: int = 0) -> Iterator[tuple[Any, dict]]:
        """(image, meta) of one reader's endless stream from its ``skip``-th sample on."""
        epoch = 0
        while True:
            total = 0
            for index in self.reader_shards(epoch, reader, readers):
                url = self.shards[index]
                if skip and skip >= self.count(url):  # consumed before a resume: its headers are enough
                    skip -= self.count(url)
                    total += self.count(url)
                    continue
                raw = list(shard_samples(url, on_broken=self._broken))
                self._counts[url] = len(raw)
                total += len(raw)
                order = np.random.default_rng([self.seed, epoch, index]).permutation(len(raw))
                fill = None  # where none of the shard's samples decodes
                for k in range(skip, len(raw)):
                    sample = None if fill is not None else self._decoded(raw, order, k)
                    if sample is None:
                        fill = fill or self._fill(epoch, reader, readers, index, len(raw))
                        sample = fill
                    yield sample
                skip = 0
                del raw, order  # one encoded shard at a time, also while the next one is read
            if total == 0:
                raise ValueError(f"ShardCorpus: reader {reader} of {readers} found no samples in its shards")
            epoch += 1

    def _broken(self, url: str, exn: BaseException) -> None:
        """A tar read up to its last whole sample (truncated, unreadable): a shard-level record."""
        self._passed_over(url, WHOLE_SHARD, f"{type(exn).__name__}: {exn}; reading it up to its last whole sample",
                          stacklevel=4)  # called back by shard_samples

    def _decoded(self, raw: list[dict[str, Any]], order: np.ndarray, k: int) -> tuple[Any, dict] | None:
        """The ``k``-th sample of the shard's ``order``, or where it does not decode (or, with
        ``needs_caption``, has no alt-text) the next one that does (None where none does): the
        stream keeps its length, so positions still follow the tar headers."""
        from webssl_repro.data.shards import decode_image, decode_text, sample_id

        for j in range(len(order)):
            candidate = raw[int(order[(k + j) % len(order)])]
            try:
                text = decode_text(candidate)
            except Exception as exn:  # noqa: BLE001 - a corrupt web sample is replaced, not fatal
                self._sample_passed_over(candidate, f"{type(exn).__name__}: {exn}")
                continue
            captions = captions_of(text)
            if self.needs_caption and not captions:  # CLIP passes over it with its image undecoded
                self._sample_passed_over(candidate, NO_ALT_TEXT)
                continue
            try:
                image = decode_image(candidate)
            except Exception as exn:  # noqa: BLE001 - a corrupt web image is replaced, not fatal
                self._sample_passed_over(candidate, f"{type(exn).__name__}: {exn}")
                continue
            return image, {"id": sample_id(text), "captions": captions}
        return None

    def _fill(self, epoch: int, reader: int, readers: int, index: int, places: int) -> tuple[Any, dict]:
        """What fills the places of shard ``index``, none of whose samples decodes: the first
        sample that does of the reader's next shards in this epoch (the same wherever a run
        resumed), so that a corrupt shard does not stop a run that cannot skip it."""
        mine = self.reader_shards(epoch, reader, readers)
        at = mine.index(index)
        for other in mine[at + 1:] + mine[:at]:
            raw = list(shard_samples(self.shards[other]))
            order = np.random.default_rng([self.seed, epoch, other]).permutation(len(raw))
            sample = self._decoded(raw, order, 0) if raw else None
            if sample is not None:  # its samples are recorded one by one, as the in-memory corpus counts them
                warnings.warn(f"webssl_repro.data.stream_corpus: {self.shards[index]}: none of its {places} "
                              f"samples decodes; their places are filled with {sample[1]['id']} of "
                              f"{self.shards[other]}", RuntimeWarning)
                return sample
        raise ValueError(f"ShardCorpus: none of the samples of reader {reader} of {readers}'s shards decodes in "
                         f"epoch {epoch}, starting with {self.shards[index]}")

    def batches(self, start_sample: int, rank: int, world_size: int, global_batch: int,
                sample_fn: SampleFn, collate_fn: CollateFn) -> Iterator[Any]:
        """This rank's batches from ``start_sample`` on (a multiple of ``global_batch``), made by
        ``workers_for(world_size)`` dataloader processes (0: this process)."""
        local = local_batch_size(global_batch, world_size)
        if start_sample % global_batch:
            raise ValueError(f"start sample {start_sample} is not a multiple of the global batch {global_batch}")
        dataset = _RankBatches(self, start_sample // global_batch, rank, world_size, global_batch, local,
                               sample_fn, collate_fn)
        return worker_batches(dataset, self.workers_for(world_size), self.seed)

    def check_resume(self, start_sample: int, trained_world_size: int, world_size: int) -> None:
        """Refuse to resume on another number of ranks: which samples a reader consumed follows
        from the step only for the readers (ranks x workers) that consumed them, and other
        readers would repeat some samples and never reach others. The workers per rank follow
        from the ranks and ``pretrain.loader``, which is part of the run's fingerprint (a change
        retrains). ``IndexedCorpus`` resumes on any number."""
        if start_sample and trained_world_size != world_size:
            raise ValueError(f"this run streams its shards (pretrain.loader.stream: true) and was trained on "
                             f"{trained_world_size} rank(s) up to sample {start_sample}; resuming it on {world_size} "
                             f"would repeat some samples and skip others. Resume it on {trained_world_size} GPUs "
                             "(the run's resources in the config), or move its checkpoints aside to start over")

    def workers_for(self, world_size: int) -> int:
        """``workers``, fewer where the shards do not give every reader one (ImageNet-1k's 1,024
        shards on 256 ranks: 4 workers each)."""
        if len(self.shards) < world_size:
            raise ValueError(f"ShardCorpus: the data manifest lists {len(self.shards)} shard(s) for {world_size} "
                             "ranks; every rank reads shards of its own, so it needs at least one per rank")
        return min(self.workers, len(self.shards) // world_size)


class _RankBatches(IterableDataset):
    """One rank's batches from global step ``first`` on; in dataloader worker ``i`` of ``n``,
    the batches ``first + i + m·n`` (those of reader ``(first + i) mod n``)."""

    def __init__(self, corpus: ShardCorpus, first: int, rank: int, world_size: int, global_batch: int,
                 local: int, sample_fn: SampleFn, collate_fn: CollateFn) -> None:
        super().__init__()
        self.corpus, self.first, self.rank, self.world_size = corpus, first, rank, world_size
        self.global_batch, self.local, self.sample_fn, self.collate_fn = global_batch, local, sample_fn, collate_fn

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.first + i
        reader = step % n  # batch k of this rank comes from its reader k mod n
        made = (step - reader) // n  # batches that reader made before this process started
        readers = self.world_size * n
        stream = self.corpus.reader_stream(self.rank * n + reader, readers, skip=made * self.local)
        seed = self.corpus.seed
        while True:
            first = step * self.global_batch + self.rank * self.local
            pairs = []
            for k in range(self.local):
                image, meta = next(stream)
                pairs.append((image, {"id": meta["id"], "caption": pick_caption(meta["captions"], seed, first + k),
                                      "index": first + k}))
            yield assemble_batch(seed, first, pairs, self.sample_fn, self.collate_fn)
            step += n

