"""Streaming pretraining corpus (``data.stream_corpus.ShardCorpus``): coverage, exact resume
with and without dataloader workers, broken data, and the alt-text formats CLIP reads."""
from __future__ import annotations

import json
import signal
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from helpers_corpus import collate_fn, sample_fn, same, shards, take  # noqa: F401  (fixture)
from helpers_tar import png_bytes, rewrite_tar, write_tar
from webssl_repro.data.corpus import IndexedCorpus, captions_of, pick_caption
from webssl_repro.data.shards import shard_samples
from webssl_repro.data.stream_corpus import ShardCorpus, count_samples


def test_counts_follow_the_tar_headers(shards):
    assert [count_samples(u) for u in shards] == [5] * 6
    first = next(shard_samples(shards[0]))
    assert {"jpg", "json"} <= set(first) and isinstance(first["jpg"], bytes)
    assert next(shard_samples(shards[0], with_data=False))["jpg"] is None


def test_each_epoch_covers_every_sample_once_across_readers(shards):
    corpus = ShardCorpus(shards, seed=1)
    ids = []
    for reader in range(3):
        stream = corpus.reader_stream(reader, 3)
        ids += [meta["id"] for _, meta in take(stream, 10)]  # each reader has 2 shards of 5
    counts = Counter(ids)
    assert len(counts) == 30 and set(counts.values()) == {1}
    with pytest.raises(ValueError, match="6 shard"):
        corpus.reader_shards(0, 0, 7)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_uninterrupted_batches(shards, workers):
    corpus = ShardCorpus(shards, seed=3, workers=workers)
    G = 8  # two ranks of 4: rank 1's batches
    whole = take(corpus.batches(0, 1, 2, G, sample_fn, collate_fn), 9)  # past one epoch of each reader
    resumed = take(corpus.batches(5 * G, 1, 2, G, sample_fn, collate_fn), 4)
    assert all(same(a, b) for a, b in zip(whole[5:], resumed))
    assert [b["index"][0] for b in whole[:3]] == [4, 12, 20]  # global sample indices of rank 1's rows
    # the two ranks read disjoint shards within an epoch
    rank0 = take(corpus.batches(0, 0, 2, G, sample_fn, collate_fn), 2)
    assert not set(sum((b["ids"] for b in rank0), [])) & set(sum((b["ids"] for b in whole[:2]), []))
    with pytest.raises(ValueError, match="multiple of the global batch"):
        corpus.batches(3, 0, 2, G, sample_fn, collate_fn)


def test_broken_shard_and_undecodable_sample_keep_positions(tmp_path, shards):
    truncated = tmp_path / "truncated.tar"
    data = open(shards[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="truncated.tar"):
        n = count_samples(str(truncated))
    with pytest.warns(RuntimeWarning):
        assert 0 < n < 5 and n == len(list(shard_samples(str(truncated))))
    # a sample whose image does not decode is replaced by the next one of the shard's order
    first = next(shard_samples(shards[1], with_data=False))["__key__"]
    bad = _spoilt(shards[1], tmp_path / "bad.tar", {first})
    corpus = ShardCorpus([bad], seed=0)
    with pytest.warns(RuntimeWarning, match="not identify|cannot identify|UnidentifiedImageError"):
        got = [meta["id"] for _, meta in take(corpus.reader_stream(0, 1), 5)]
    assert len(got) == 5 and len(set(got)) == 4  # five positions, one image shown twice


def test_alt_text_formats(tmp_path):
    assert captions_of({"meta": {"caption": "a dog"}}) == ("a dog",)
    metaclip = {"meta": {"texts": [["alt", "a red car", 0], ["title", "my car", 1]]}}
    assert captions_of(metaclip) == ("a red car", "my car")
    assert captions_of({"meta": {}, "txt": "from txt"}) == ("from txt",)
    assert captions_of({"meta": {}}) == ()
    picks = {pick_caption(("a", "b", "c"), 0, i) for i in range(40)}
    assert picks == {"a", "b", "c"} and pick_caption(("a", "b"), 5, 7) == pick_caption(("a", "b"), 5, 7)
    # a .txt member reaches the stream's captions
    path = write_tar(tmp_path / "txt.tar", [("s0.png", png_bytes((10, 20, 30))), ("s0.txt", b"a plain caption\n"),
                                            ("s0.json", json.dumps({"url": "x"}).encode())])
    _, meta = next(ShardCorpus([path]).reader_stream(0, 1))
    assert meta["captions"] == ("a plain caption",) and meta["id"] == "s0"


def test_open_corpus_and_clip_captions(shards):
    from webssl_repro.train.run import _seeded, open_corpus

    assert isinstance(open_corpus(shards[:1], 0, {}), IndexedCorpus)
    assert isinstance(open_corpus(shards, 0, {"stream": True, "workers": 2}), ShardCorpus)
    with pytest.raises(KeyError, match="worker"):
        open_corpus(shards, 0, {"stream": True, "worker": 2})
    fn = _seeded(lambda image: torch.zeros(1), with_caption=True)
    with pytest.raises(ValueError, match="sample s7 has no caption"):
        fn(None, {"id": "s7", "caption": ""}, torch.Generator().manual_seed(0))


def test_workers_leave_the_global_random_stream_alone(shards):
    """A resumed trainer restores its RNG, then opens the data: the loader must not draw from it."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    it = ShardCorpus(shards, seed=3, workers=2).batches(0, 0, 1, 4, sample_fn, collate_fn)
    next(it)
    assert torch.equal(torch.rand(3), expected)


def test_streamed_pretraining_resumes_bitwise(tmp_path, shards, monkeypatch):
    """``pretrain`` with ``pretrain.loader.stream``: a run stopped at step 2 and resumed (its
    dataloader workers restarted mid-epoch) ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from helpers_mini import run_slice
    from webssl_repro.train.run import pretrain

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": shards}))
    cfg = run_slice("mae1b-full2b-224", samples=5 * 8, checkpoint_every=1)
    cfg["recipe"]["batch_size"] = 8
    cfg["loader"] = {"stream": True, "workers": 2}
    straight = pretrain("mae1b-full2b-224", cfg, tmp_path / "a", tmp_path / "ca", [str(manifest)])
    assert straight.complete and straight.step == 5
    assert not pretrain("mae1b-full2b-224", cfg, tmp_path / "b", tmp_path / "cb", [str(manifest)], max_steps=2).complete
    starts, batches = [], ShardCorpus.batches
    monkeypatch.setattr(ShardCorpus, "batches", lambda self, start, *a: starts.append(start) or batches(self, start, *a))
    assert pretrain("mae1b-full2b-224", cfg, tmp_path / "b", tmp_path / "cb", [str(manifest)]).complete
    assert starts == [2 * 8]  # resumed at the third batch, not started over
    a, b = load_file(tmp_path / "a" / "encoder.safetensors"), load_file(tmp_path / "b" / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert provenance["corpus_shards"] == 6 and "corpus_size" not in provenance
    recipe = provenance["recipe"]  # as resolved: the config's values and the code's defaults
    assert (recipe["method"]["batch_size"], recipe["method"]["mask_ratio"]) == (8, 0.75)
    assert (recipe["train"]["samples_seen"], recipe["train"]["global_batch_size"]) == (40, 8)


def test_workers_shrink_to_the_shards_there_are(shards):
    corpus = ShardCorpus(shards, workers=8)
    assert [corpus.workers_for(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert ShardCorpus(shards, workers=0).workers_for(4) == 0
    with pytest.raises(ValueError, match="6 shard\\(s\\) for 7 ranks"):
        corpus.workers_for(7)


def test_remote_shards_stream_filter_and_list(tmp_path, shards):
    """``pipe:`` / URL shards (webdataset's gopen): streamed, resharded by a filter, and kept as
    given by a manifest (not taken for paths relative to it)."""
    from webssl_repro.data.corpus import read_manifest
    from webssl_repro.data.stages import kept_shards

    remote = [f"pipe:cat {u}" for u in shards[:2]]
    assert [count_samples(u) for u in remote] == [5, 5]
    local_ids = [m["id"] for _, m in take(ShardCorpus(shards[:2], seed=2).reader_stream(0, 1), 10)]
    remote_ids = [m["id"] for _, m in take(ShardCorpus(remote, seed=2).reader_stream(0, 1), 10)]
    assert remote_ids == local_ids
    keys = [s["__key__"] for s in shard_samples(shards[1], with_data=False)]
    kept = kept_shards(remote, [(remote[1], keys[1], 1), (remote[1], keys[3], 3)], str(tmp_path / "kept"))
    assert kept == [str(tmp_path / "kept" / "00001.tar")]
    assert [s["__key__"] for s in shard_samples(kept[0])] == [keys[1], keys[3]]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"shards": [remote[0], "rel.tar", "s3://b/x.tar"]}))
    assert read_manifest(manifest)["shards"] == [remote[0], str(tmp_path / "rel.tar"), "s3://b/x.tar"]
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="copied 0 of its 1 kept samples"):
        kept_shards(["pipe:cat /nowhere.tar"], [("pipe:cat /nowhere.tar", "k", 0)], str(tmp_path / "gone"))


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_a_run_records_what_its_corpus_skipped(tmp_path, shards, stream):
    """A user's shards may hold a broken tar and an image that does not decode: the run trains on
    the rest (as webdataset readers do) and its provenance says how much was skipped and why.
    Streamed, the readers are dataloader workers recording in the checkpoints' folder, and the
    run, stopped and resumed, reads the bad sample more than once: it still counts once."""
    from helpers_mini import run_slice
    from webssl_repro.train.run import pretrain

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    bad = next(shard_samples(shards[0], with_data=False))["__key__"]
    manifest = tmp_path / "manifest.json"  # a bad image, a shard of 5 bad ones (streamed: filled), a junk tar
    manifest.write_text(json.dumps({"shards": [_spoilt(shards[0], tmp_path / "spoilt.tar", {bad}),
                                               _spoilt(shards[1], tmp_path / "dead.tar"), *shards[2:], str(junk)]}))
    cfg = run_slice("mae1b-full2b-224", samples=6 * 8)  # 48 samples: more than an epoch of the 30
    cfg["recipe"]["batch_size"] = 8
    if stream:
        cfg["loader"] = {"stream": True, "workers": 1}
    args = ("mae1b-full2b-224", cfg, tmp_path / "run", tmp_path / "ckpt", [str(manifest)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # said per sample, by the workers too
        if stream:
            assert not pretrain(*args, max_steps=5).complete  # the epoch read, the bad sample passed over
        assert pretrain(*args).complete
    skipped = json.loads((tmp_path / "run" / "provenance.json").read_text())["corpus_skipped"]
    assert (skipped["samples"], skipped["shards"]) == (6, 1), skipped  # counted alike, in memory and streamed
    assert any("junk.tar" in e for e in skipped["errors"]) and any(bad in e for e in skipped["errors"])
    files = [p.read_text().splitlines() for p in (tmp_path / "ckpt" / "passed_over").glob("*.tsv")]
    assert all(len(set(lines)) == len(lines) for lines in files)  # each process writes a sample once
    assert sum(f"\t{bad}\t" in line for lines in files for line in lines) == (2 if stream else 0)  # 2 attempts


def _rewritten(src: str, out, suffix: str, keys: set[str] | None, rewrite) -> str:
    """A copy of shard ``src`` whose ``suffix`` members of ``keys`` (all: None) hold ``rewrite(payload)``."""
    def change(name: str, payload: bytes) -> bytes:
        hit = name.endswith(suffix) and (keys is None or name.split(".")[0] in keys)
        return rewrite(payload) if hit else payload

    return rewrite_tar(src, out, change)


def _spoilt(src: str, out, keys: set[str] | None = None) -> str:
    """A copy of shard ``src`` whose images of ``keys`` (all: None) do not decode."""
    return _rewritten(src, out, ".jpg", keys, lambda _: b"not a jpeg")


def test_a_shard_none_of_whose_samples_decodes_is_filled_from_the_next(tmp_path, shards):
    """Its five places are kept, filled with the first image that decodes of the reader's next
    shard in the epoch, the same when a resumed reader starts inside it; a reader none of whose
    shards decodes says so."""
    corpus = ShardCorpus([_spoilt(shards[0], tmp_path / "junk.tar"), *shards[1:3]], seed=3)
    mine = corpus.reader_shards(0, 0, 1)
    at = mine.index(0)
    nxt = corpus.shards[mine[(at + 1) % 3]]
    order = np.random.default_rng([3, 0, mine[(at + 1) % 3]]).permutation(5)  # the next shard's, as streamed
    fill = [s["__key__"] for s in shard_samples(nxt, with_data=False)][int(order[0])]
    with pytest.warns(RuntimeWarning, match=r"junk.tar: none of its 5 samples decodes; their places are filled"):
        ids = [m["id"] for _, m in take(corpus.reader_stream(0, 1), 15)]
    before = sum(corpus.count(corpus.shards[i]) for i in mine[:at])
    assert ids[before:before + 5] == [fill] * 5 and len(set(ids) - {fill}) == 9
    with pytest.warns(RuntimeWarning, match="junk.tar"):
        resumed = [m["id"] for _, m in take(corpus.reader_stream(0, 1, skip=before + 2), 13 - before)]
    assert resumed == ids[before + 2:15]
    dead = ShardCorpus([_spoilt(shards[0], tmp_path / "dead.tar")], seed=3)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="none of the samples of reader 0 of 1"):
        next(dead.reader_stream(0, 1))


def test_a_shard_cut_at_a_member_boundary_loses_its_half_sample(tmp_path, shards):
    """A tar cut after an image's member reads as a whole shorter tar: the image without its
    json is dropped and the shard counted once as broken, in memory (as the filter reads) and
    streamed alike."""
    from webssl_repro.data.loader import make_loader

    with tarfile.open(shards[0]) as tin:
        members = tin.getmembers()
    cut = members[-2]  # the last sample's first member (sorted: .jpg before .json)
    assert cut.name.endswith(".jpg")
    data = open(shards[0], "rb").read()
    half = tmp_path / "half.tar"
    half.write_bytes(data[: cut.offset_data + -(-cut.size // 512) * 512])
    with pytest.warns(RuntimeWarning, match=r"no end-of-archive block after .*: cut off at a member boundary"):
        assert count_samples(str(half)) == 4
    stream = make_loader([str(half), shards[1]], shuffle_shards=False)
    with pytest.warns(RuntimeWarning):
        got = list(stream)
    assert len(got) == 9 and all(s["meta"]["id"] != cut.name.split(".")[0] for s in got)
    assert (stream.stats.broken_shards, stream.stats.skipped_samples) == (1, 0)
    mid = tmp_path / "mid.tar"
    mid.write_bytes(data[: members[3].offset_data + 100])  # inside a member
    stream = make_loader([str(mid)], shuffle_shards=False)
    with pytest.warns(RuntimeWarning):
        assert len(list(stream)) == 1
    assert stream.stats.broken_shards == 1  # once, not once per layer that noticed


def test_fewer_shards_than_readers_count_each_failure_once(tmp_path, shards):
    """Every reader reads the one shard and keeps every n-th sample: a bad image and a broken
    shard are each counted by one reader, so the summed counts do not grow with the readers."""
    from webssl_repro.data.loader import make_loader

    keys = [s["__key__"] for s in shard_samples(shards[0], with_data=False)]
    bad = _spoilt(shards[0], tmp_path / "bad.tar", {keys[2]})
    for readers in (1, 2, 3):
        counts = [0, 0, 0]
        for gw in range(readers):
            stream = make_loader([bad, str(tmp_path / "gone.tar")], rank=gw, world_size=readers,
                                 shuffle_shards=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a reader with nothing to count says nothing
                counts[0] += len(list(stream))
            counts[1] += stream.stats.skipped_samples
            counts[2] += stream.stats.broken_shards
        assert counts == [4, 1, 1], readers


def test_a_streamed_run_resumes_only_on_its_own_number_of_ranks(tmp_path, shards):
    """The checkpoint says it was trained on 2 ranks: resuming on 1 would repeat and skip
    samples, so the run stops and says how to go on (an in-memory corpus resumes on any number:
    test_train_distributed)."""
    from helpers_mini import run_slice
    from webssl_repro.train.run import pretrain

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": shards}))
    cfg = run_slice("mae1b-full2b-224", samples=5 * 8, checkpoint_every=1)
    cfg["recipe"]["batch_size"] = 8
    cfg["loader"] = {"stream": True, "workers": 0}
    assert not pretrain("mae1b-full2b-224", cfg, tmp_path / "a", tmp_path / "ca", [str(manifest)], max_steps=2).complete
    from webssl_repro.train.checkpoint import POINTER, checkpoint_dir

    pointer = checkpoint_dir(tmp_path / "ca") / POINTER
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "world_size": 2}))
    with pytest.raises(ValueError, match=r"trained on 2 rank\(s\) up to sample 16; resuming it on 1 .* Resume it "
                                         r"on 2 GPUs"):
        pretrain("mae1b-full2b-224", cfg, tmp_path / "a", tmp_path / "ca", [str(manifest)])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_of_the_job_preempts_a_streamed_run(tmp_path, shards, signum):
    """SLURM signals every process of the job, the streamed loader's workers too (here from a
    ``kill`` process, as from slurmstepd: not their parent): they leave the signal to the
    trainer, which saves and stops (``Preempted``), instead of failing on a worker the signal
    killed."""
    import multiprocessing
    import os
    import subprocess
    import time

    from helpers_toy import GLOBAL_BATCH, ToyMethod, make_cfg
    from webssl_repro.train import Preempted, read_pointer, train

    corpus = ShardCorpus(shards, seed=0, workers=2)

    def gray16(image, meta, gen):  # the toy's 16 inputs: a 4x4 grey thumbnail
        return torch.from_numpy(np.asarray(image.convert("L").resize((4, 4)), dtype=np.float32).flatten() / 255)

    class SignalledJob(ToyMethod):
        def training_step(self, batch, step):
            if step == 2:
                workers = multiprocessing.active_children()  # this loader's two, and any an earlier test left
                assert len(workers) >= 2
                subprocess.run(["kill", "-s", signal.Signals(signum).name[3:], *(str(c.pid) for c in workers)],
                               check=True)
                time.sleep(1.0)  # a killed worker would be dead by now
                os.kill(os.getpid(), signum)
            return super().training_step(batch, step)

    def data(start, rank, world):
        return corpus.batches(start, rank, world, GLOBAL_BATCH, gray16, lambda samples, gen: torch.stack(samples))

    with pytest.raises(Preempted) as info:
        train(SignalledJob(), data, make_cfg(checkpoint_every=100), tmp_path / "run")
    assert info.value.step == 3 and info.value.signum == signum and read_pointer(tmp_path / "run")["step"] == 3


@pytest.mark.parametrize("start", ["fork", "spawn", "forkserver"])
def test_job_loader_workers_leave_signals_to_the_trainer_and_end_with_it(tmp_path, start):
    """Whatever starts the workers: SIGTERM and SIGUSR1 from another process (slurmstepd) leave
    them alive once started (the loader still yields), and a process that exits with its
    loader open (preempted: exit 75) ends them and exits rather than hanging on them."""
    import subprocess
    import sys

    script = tmp_path / "leave_open.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "import torch\n"
        "from torch.utils.data import IterableDataset\n"
        "from webssl_repro.data.workers import JobDataLoader\n"
        "class Endless(IterableDataset):\n"
        "    def __iter__(self):\n"
        "        while True:\n"
        "            yield torch.zeros(2)\n"
        "if __name__ == '__main__':\n"
        "    held = iter(JobDataLoader(Endless(), batch_size=None, num_workers=2,\n"
        f"                              multiprocessing_context={start!r}))\n"
        "    [next(held) for _ in range(4)]  # from each worker in turn: both past their start\n"
        "    pids = [str(w.pid) for w in held._workers]\n"
        "    for sig in ('TERM', 'USR1'):\n"
        "        subprocess.run(['kill', '-s', sig, *pids], check=True)\n"
        "    time.sleep(1.0)\n"
        "    assert all(w.is_alive() for w in held._workers)\n"
        "    [next(held) for _ in range(8)]\n"
        "    raise SystemExit(75)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr[-2000:]


def test_a_repeated_key_passed_over_twice_counts_as_two_samples(tmp_path):
    """A tar that repeats a key holds two samples: two of them that do not decode count as two
    in the run's provenance, streamed as in memory (records name a sample by its tar position)."""
    from webssl_repro.train.run import open_corpus

    meta = {"id": "x", "caption": "a caption"}
    shard = write_tar(tmp_path / "twice.tar", [
        (name, payload) for key, image in (("a", b"not an image"), ("a", b"still not one"), ("b", png_bytes((9, 9, 9))))
        for name, payload in ((f"{key}.png", image), (f"{key}.json", json.dumps({**meta, "id": key}).encode()))])
    with pytest.warns(RuntimeWarning):
        held = open_corpus([shard], 0, {})
    streamed = ShardCorpus([shard], record_dir=tmp_path / "rec")
    with pytest.warns(RuntimeWarning, match="sample a of"):
        assert {m["id"] for _, m in take(streamed.reader_stream(0, 1), 6)} == {"b"}
    assert held.stats.skipped_samples == streamed.stats.skipped_samples == 2
    assert len(streamed.stats.errors) == 2
    # a record written before positions were kept (url, key, why) still reads, and counts once
    # beside the same sample recorded with its position by the run resumed after the change
    (tmp_path / "rec" / "old.tsv").write_text(f"{shard}\tc\tOSError: gone\n{shard}\ta\tOSError: bad\n")
    assert streamed.stats.skipped_samples == 3 and len(streamed.stats.errors) == 3


def test_compressed_local_shards_and_repeated_keys_keep_every_sample(tmp_path, shards):
    """A local .tar.gz / .tar.bz2 / .tar.xz is read as the stream it is (it read as a broken
    shard of no sample); a tar that repeats a key yields each occurrence as a sample of its own,
    where the second once overwrote the first."""
    import gzip
    import bz2
    import lzma

    plain = [(s["__key__"], s["jpg"]) for s in shard_samples(shards[0])]
    data = open(shards[0], "rb").read()
    for name, compress in (("s.tar.gz", gzip.compress), ("s.tar.bz2", bz2.compress), ("s.tar.xz", lzma.compress)):
        path = tmp_path / name
        path.write_bytes(compress(data))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not reported as broken
            assert [(s["__key__"], s["jpg"]) for s in shard_samples(str(path))] == plain, name
    twice = write_tar(tmp_path / "twice.tar", [(f"a.{suffix}", text) for text in (b"first", b"second")
                                               for suffix in ("jpg", "txt")])
    assert [(s["jpg"], s["txt"]) for s in shard_samples(twice)] == [(b"first", b"first"),
                                                                         (b"second", b"second")]


def _uncaptioned(src: str, out, keys: set[str]) -> str:
    """A copy of shard ``src`` whose samples of ``keys`` have no alt-text (json without a caption)."""
    def drop_captions(payload: bytes) -> bytes:
        meta = json.loads(payload)
        meta.pop("caption", None)
        meta.pop("texts", None)
        return json.dumps(meta).encode()

    return _rewritten(src, out, ".json", keys, drop_captions)


def test_clip_corpora_pass_over_samples_without_an_alt_text(tmp_path, shards):
    """A CLIP run's corpus leaves out a sample with no alt-text, held in memory or streamed (its
    place taken by the shard's next sample), where the sample stopped the run at the same step
    on every retry; other methods keep it."""
    from webssl_repro.train.run import _seeded, open_corpus

    keys = [s["__key__"] for s in shard_samples(shards[0], with_data=False)]
    shard = _uncaptioned(shards[0], tmp_path / "nocap.tar", {keys[1]})
    with pytest.warns(RuntimeWarning, match="1 sample\\(s\\) without an alt-text left out"):
        held = open_corpus([shard, shards[1]], 0, {}, needs_caption=True)
    assert len(held) == 9 and held.uncaptioned == 1 and len(open_corpus([shard, shards[1]], 0, {})) == 10
    fn = _seeded(lambda image: torch.zeros(1), with_caption=True)
    take_clip = lambda corpus: take(corpus.batches(0, 0, 1, 5, fn, lambda s, g: [c for _, c in s]), 4)
    assert all(all(batch) for batch in take_clip(held))
    streamed = open_corpus([shard, shards[1]], 0, {"stream": True}, needs_caption=True)
    with pytest.warns(RuntimeWarning, match=f"sample {keys[1]} of .*nocap.tar: has no alt-text for CLIP"):
        batches = take_clip(streamed)
    assert all(all(batch) for batch in batches)
    with pytest.raises(ValueError, match="has no caption for CLIP"):  # what the run met before
        take_clip(open_corpus([shard, shards[1]], 0, {"stream": True}))
    # its alt-text is read first: a sample without one is passed over with its image undecoded
    spoilt = _spoilt(shard, tmp_path / "nocap-junk.tar", {keys[1]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        take_clip(open_corpus([spoilt, shards[1]], 0, {"stream": True}, needs_caption=True))
    said = [str(w.message) for w in caught if keys[1] in str(w.message)]
    assert said and all(m.endswith("has no alt-text for CLIP") for m in said), said
    # counted as the in-memory corpus counts it: apart from the samples that do not decode
    recorded = open_corpus([shard, shards[1]], 0, {"stream": True}, needs_caption=True, record_dir=tmp_path / "rec")
    with pytest.warns(RuntimeWarning):
        take_clip(recorded)
    assert (recorded.uncaptioned, recorded.stats.skipped_samples, recorded.stats.errors) == (1, 0, [])
