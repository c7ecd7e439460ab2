"""The in-memory pretraining corpus (``data.corpus.IndexedCorpus``): a batch is a function of
its sample indices, whether its images are kept decoded or PNG-encoded and whichever
process (the trainer or a dataloader worker) builds it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_corpus import collate_fn, sample_fn, same, shards, take  # noqa: F401  (fixture)
from webssl_repro.data.corpus import IndexedCorpus


def test_decoded_and_encoded_images_are_the_same_images(shards):
    decoded, encoded = IndexedCorpus(shards, seed=2), IndexedCorpus(shards, seed=2, max_decoded_bytes=0)
    assert decoded.decoded_bytes == 30 * 16 * 16 * 3 and encoded.decoded_bytes == 0
    mixed = IndexedCorpus(shards, seed=2, max_decoded_bytes=10 * 16 * 16 * 3 + 5)  # the first 10 fit
    kinds = [isinstance(item.image, np.ndarray) for item in mixed.items]
    assert kinds == [True] * 10 + [False] * 20 and mixed.decoded_bytes == 10 * 16 * 16 * 3
    for i in (0, 9, 10, 29, 47):  # 47: the second epoch
        images = [np.asarray(c.sample(i)[0]) for c in (decoded, encoded, mixed)]
        assert images[0].shape == (16, 16, 3) and images[0].dtype == np.uint8
        assert all(np.array_equal(images[0], other) for other in images[1:])
    batches = [take(c.batches(0, 0, 1, 8, sample_fn, collate_fn), 5) for c in (decoded, encoded, mixed)]
    assert all(same(a, b) for other in batches[1:] for a, b in zip(batches[0], other))
    image = decoded.sample(0)[0]  # what a crop gets: altering it leaves the corpus alone
    image.putpixel((0, 0), (1, 2, 3))
    image.paste((7, 7, 7), (0, 0, 16, 16))
    assert np.array_equal(np.asarray(decoded.sample(0)[0]), np.asarray(encoded.sample(0)[0]))


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_workers_make_the_batches_of_one_process(shards, world_size, rank):
    """Two workers take turns; the batches, their order and a resume mid-epoch are those of the
    trainer's own process (sample ``i`` is the ``i``-th of one global order)."""
    alone = take(IndexedCorpus(shards, seed=5).batches(0, rank, world_size, 8, sample_fn, collate_fn), 9)
    corpus = IndexedCorpus(shards, seed=5, workers=2)
    assert all(same(a, b) for a, b in zip(alone, take(corpus.batches(0, rank, world_size, 8, sample_fn, collate_fn), 9)))
    resumed = take(corpus.batches(3 * 8, rank, world_size, 8, sample_fn, collate_fn), 5)
    assert all(same(a, b) for a, b in zip(alone[3:], resumed))
    local = 8 // world_size
    assert [b["index"][0] for b in alone[:3]] == [s * 8 + rank * local for s in range(3)]
    assert len(alone[0]["ids"]) == local


def test_each_epoch_is_a_new_order_of_every_image(shards):
    batches = take(IndexedCorpus(shards, seed=5).batches(0, 0, 1, 6, sample_fn, collate_fn), 10)
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids[:30]) == sorted(ids[30:]) and len(set(ids[:30])) == 30 and ids[:30] != ids[30:]


def test_workers_fork_whatever_pythons_default_start_method(shards, monkeypatch):
    """The pipelines are closures of ``train.run.build``: under spawn or forkserver (the Linux
    default from Python 3.14) a worker could not unpickle them."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    shift = torch.tensor(0.5)

    def shifted(image, meta, gen):  # a closure, as build's pipelines are
        x, key, index = sample_fn(image, meta, gen)
        return x + shift, key, index

    alone = take(IndexedCorpus(shards, seed=1).batches(0, 0, 1, 4, shifted, collate_fn), 3)
    forked = take(IndexedCorpus(shards, seed=1, workers=1).batches(0, 0, 1, 4, shifted, collate_fn), 3)
    assert all(same(a, b) for a, b in zip(alone, forked))


def test_workers_leave_the_global_random_stream_alone(shards):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(IndexedCorpus(shards, seed=3, workers=2).batches(0, 0, 1, 4, sample_fn, collate_fn))
    assert torch.equal(torch.rand(3), expected)


def test_open_corpus_gives_the_in_memory_corpus_its_workers(shards):
    from webssl_repro.train.run import open_corpus

    corpus = open_corpus(shards, 0, {"workers": 2})
    assert isinstance(corpus, IndexedCorpus) and corpus.workers == 2
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        IndexedCorpus(shards, workers=-1)
