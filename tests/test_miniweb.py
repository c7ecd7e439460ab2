"""Mini-web generator and webdataset shards: determinism, proportions, ground truth, loading."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers_tar import png_bytes, write_tar
from webssl_repro.data.miniweb import (
    OBJECT_CLASSES, SEG_ID, MiniWebConfig, generate, render, sample_spec,
)
from webssl_repro.data.shards import shard_ranges, write_shard
from webssl_repro.data.loader import STATS_KEY, make_loader, shard_batches


def test_same_seed_same_bytes_and_different_seed_differs():
    a, b, c = generate(3, 7), generate(3, 7), generate(4, 7)
    assert a.encode_image("png") == b.encode_image("png")
    assert a.meta == b.meta and np.array_equal(a.seg, b.seg) and np.array_equal(a.depth, b.depth)
    assert a.encode_image("png") != c.encode_image("png")
    assert generate(3, 8).meta["caption"] != a.meta["caption"] or generate(3, 8).encode_image() != a.encode_image()


@pytest.mark.parametrize("size", [32, 64, 224])
def test_any_size_renders_the_same_world(size):
    s = generate(11, 5, size=size)
    assert s.image.size == (size, size) and s.seg.shape == (size, size) and s.depth.shape == (size, size)
    ref = generate(11, 5, size=64).meta
    assert {k: v for k, v in s.meta.items() if k != "size"} == {k: v for k, v in ref.items() if k != "size"}
    json.dumps(s.meta)


def test_default_world_proportions_are_webby():
    specs = [sample_spec(0, i) for i in range(600)]
    text = np.mean([s["has_text"] for s in specs])
    ctd = np.mean([s["is_chart_table_doc"] for s in specs])
    assert 0.42 <= text <= 0.58, text
    assert 0.0 < ctd <= 0.05, ctd
    assert all(s["has_text"] == bool(s["strings"]) for s in specs)


def test_configured_proportions_are_followed():
    cfg = MiniWebConfig(kinds={"objects": 0.1, "text_scene": 0.1, "chart": 0.4, "document": 0.4})
    kinds = [sample_spec(1, i, cfg)["kind"] for i in range(400)]
    assert abs(kinds.count("chart") / 400 - 0.4) < 0.08
    assert abs(kinds.count("objects") / 400 - 0.1) < 0.05


@pytest.mark.parametrize("kinds", [{}, {"objects": 0.0, "chart": 0.0}])
def test_a_mix_with_no_weight_is_refused(kinds):
    with pytest.raises(ValueError, match="gives no kind a weight above 0"):
        MiniWebConfig(kinds=kinds)


def test_mask_depth_and_boxes_agree_with_objects():
    cfg = MiniWebConfig(kinds={"objects": 1.0}, noise=0.0)
    checked = 0
    for i in range(40):
        s = generate(2, i, cfg, size=96)
        objs = s.meta["objects"]
        classes = {SEG_ID[o["class"]] for o in objs}
        ids = set(np.unique(s.seg)) - {0}
        assert ids <= classes, (ids, classes)
        for o in objs:
            if sum(p["class"] == o["class"] for p in objs) != 1:
                continue
            m = s.seg == SEG_ID[o["class"]]
            assert m.sum() > 0, f"object {o['class']} fully hidden in {s.meta['id']}"
            assert np.allclose(s.depth[m], o["depth"], atol=1e-3)
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = (v * 96 for v in o["box"])
            assert xs.min() >= x0 - 1.5 and xs.max() <= x1 + 1.5 and ys.min() >= y0 - 1.5 and ys.max() <= y1 + 1.5
            checked += 1
        near = sorted(objs, key=lambda o: o["depth"])
        assert [o["depth"] for o in objs] == sorted((o["depth"] for o in objs), reverse=True)  # painter's order
        assert near[0]["box"][3] >= near[-1]["box"][3] - 0.1  # nearer stands lower on the ground plane
    assert checked > 60


def test_text_scenes_carry_signs_and_charts_carry_data():
    t = generate(5, 1, kind="text_scene")
    assert t.meta["has_text"] and t.meta["strings"] and (t.seg == SEG_ID["sign"]).any()
    c = generate(5, 2, kind="chart")
    assert c.meta["is_chart_table_doc"] and len(c.meta["chart"]["values"]) == len(c.meta["chart"]["labels"])
    d = generate(5, 3, kind="document")
    assert d.meta["is_chart_table_doc"] and d.meta["document"]["title"] in d.meta["strings"]


def test_in1k_subset_is_class_balanced_and_object_centric():
    cfg = MiniWebConfig(source="in1k")
    labels = [sample_spec(0, i, cfg)["label"] for i in range(len(OBJECT_CLASSES) * 3)]
    assert np.bincount(labels).tolist() == [3] * len(OBJECT_CLASSES)
    s = generate(0, 5, cfg)
    assert s.meta["kind"] == "in1k" and len(s.meta["objects"]) == 1 and not s.meta["has_text"]
    assert (s.seg == SEG_ID[OBJECT_CLASSES[5]]).mean() > 0.05


def test_render_larger_keeps_geometry():
    spec = sample_spec(8, 3, kind="objects")
    _, seg64, _ = render(spec, 64)
    _, seg256, _ = render(spec, 256)
    small = np.asarray(Image.fromarray(seg256).resize((64, 64), Image.NEAREST))
    assert (small == seg64).mean() > 0.9


# --- shards -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for k, (start, count) in enumerate(shard_ranges(40, 10)):
        write_shard(str(d / f"shard-{k:05d}.tar"), 0, start, count, None, image_format="png", with_arrays=True)
    return d


def test_shard_bytes_are_deterministic_and_round_trip(shard_dir, tmp_path):
    again = tmp_path / "again.tar"
    summary = write_shard(str(again), 0, 10, 10, None, image_format="png", with_arrays=True)
    assert summary["count"] == 10 and sum(summary["kinds"].values()) == 10
    assert again.read_bytes() == (shard_dir / "shard-00001.tar").read_bytes()
    samples = list(make_loader(str(again), arrays=True, shuffle_shards=False, rank=0, world_size=1))
    assert [s["meta"]["index"] for s in samples] == list(range(10, 20))
    ref = generate(0, 13)
    got = samples[3]
    assert np.array_equal(np.asarray(got["image"]), np.asarray(ref.image))
    assert np.array_equal(got["seg"], ref.seg) and np.allclose(got["depth"], ref.depth)
    assert got["meta"]["caption"] == ref.meta["caption"]


def test_ranks_and_workers_split_disjoint_and_covering(shard_dir):
    pattern = str(shard_dir / "shard-{00000..00003}.tar")
    per_rank = []
    for rank in range(2):
        loader = make_loader(pattern, rank=rank, world_size=2, num_workers=2)
        per_rank.append([s["__key__"] for s in loader])
    all_keys = per_rank[0] + per_rank[1]
    assert len(all_keys) == 40 and len(set(all_keys)) == 40
    assert not set(per_rank[0]) & set(per_rank[1])


def test_shard_batches_cut_at_each_shard_and_readers_counts_ride_along():
    a, b, c = ([{"__url__": url, "i": i} for i in range(n)] for url, n in (("a", 3), ("b", 1), ("c", 2)))
    stats = {STATS_KEY: {"reader": 0}}
    got = list(shard_batches([*a, *b, stats, *c, stats], 2))
    assert got == [a[:2], a[2:], [*b, stats], [*c, stats]]
    assert [len(x) for x in shard_batches([{"i": i} for i in range(5)], 2)] == [2, 2, 1]  # no shards: by size
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        list(shard_batches(a, 0))


def test_loader_batches_within_shards_for_any_number_of_workers(shard_dir, monkeypatch):
    """Also with workers started by spawn, on a platform without fork (forkserver pickles the
    same way): the loader's pieces must pickle."""
    import multiprocessing

    pattern = str(shard_dir / "shard-{00000..00003}.tar")
    batches = {}
    for workers, start in ((0, None), (2, "fork"), (2, "spawn")):
        if start is not None:
            monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda start=start: [start])
            monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, start=start, **k: start)
        loader = make_loader(pattern, batch_size=4, num_workers=workers, shuffle_shards=False, rank=0, world_size=1,
                             within_shards=True)
        batches[start] = sorted([x["meta"]["index"] for x in batch] for batch in loader)
    assert batches[None] == batches["fork"] == batches["spawn"]
    assert [len(x) for x in batches[None]] == [4, 4, 2] * 4 and all(len({i // 10 for i in x}) == 1 for x in batches[None])
    with pytest.raises(ValueError, match="within_shards=True.*needs a batch_size"):
        make_loader(pattern, within_shards=True)


def test_fewer_shards_than_readers_splits_samples(shard_dir):
    urls = [str(shard_dir / "shard-00000.tar")]
    keys = [[s["__key__"] for s in make_loader(urls, rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(keys, [])) == sorted(set(sum(keys, []))) and len(sum(keys, [])) == 10
    assert [len(k) for k in keys] == [4, 3, 3]


def test_resampling_reaches_the_budget(shard_dir):
    seen = []
    for rank in range(2):
        loader = make_loader(str(shard_dir), rank=rank, world_size=2, samples=101, seed=3)
        seen.append([s["__key__"] for s in loader])
    assert [len(s) for s in seen] == [51, 50]
    counts = np.unique(seen[0] + seen[1], return_counts=True)[1]
    assert len(counts) == 40 and counts.min() >= 2 and counts.max() <= 3


def _garbage_shard(path):
    members = (("good", png_bytes((200, 10, 10))), ("bad", b"this is not a png"))
    write_tar(path, [(f"{key}{ext}", data) for key, payload in members
                     for ext, data in ((".png", payload), (".json", json.dumps({"id": key}).encode()))])


def test_corrupt_and_truncated_shards_are_skipped_and_counted(shard_dir, tmp_path):
    good = (shard_dir / "shard-00002.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(good[: len(good) // 2])
    _garbage_shard(tmp_path / "garbage.tar")
    urls = [str(shard_dir / "shard-00000.tar"), str(tmp_path / "trunc.tar"), str(tmp_path / "garbage.tar"),
            str(tmp_path / "missing.tar")]
    loader = make_loader(urls, shuffle_shards=False, rank=0, world_size=1)
    with pytest.warns(RuntimeWarning, match="skipping"):
        keys = [s["__key__"] for s in loader]
    assert keys[:10] == [f"s0-{i:09d}" for i in range(10)]
    assert "good" in keys and "bad" not in keys
    assert 10 + 1 + 1 <= len(keys) <= 10 + 10 + 1  # some of the truncated shard survives, never all
    assert loader.stats.skipped_samples == 1
    assert loader.stats.broken_shards == 2  # truncated + missing
    assert loader.stats.samples == len(keys)


def test_image_folder_source(tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / cls)
        for k in range(3):
            generate(k, 0).image.save(tmp_path / cls / f"{k}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    loader = make_loader(str(tmp_path), rank=0, world_size=1, shuffle_shards=False)
    with pytest.warns(RuntimeWarning):
        samples = list(loader)
    assert [s["meta"]["label"] for s in samples] == [0, 0, 0, 1, 1, 1]
    assert loader.stats.skipped_samples == 1


def test_a_folder_of_compressed_shards_is_read_as_shards(shard_dir, tmp_path):
    """A folder source holds tars, plain or compressed (.tar.gz, .tgz...), which the reader opens;
    a folder of .tar.gz once read as an image folder with no image in it."""
    import gzip
    import shutil

    import lzma

    tars = sorted(shard_dir.glob("*.tar"))[:2]
    want = [s["__key__"] for s in make_loader([str(t) for t in tars], rank=0, world_size=1, shuffle_shards=False)]
    mixed, compressed = tmp_path / "mixed", tmp_path / "compressed"
    mixed.mkdir(), compressed.mkdir()
    shutil.copy(tars[0], mixed / "a.tar")
    (mixed / "b.tar.gz").write_bytes(gzip.compress(tars[1].read_bytes()))
    (compressed / "a.tgz").write_bytes(gzip.compress(tars[0].read_bytes()))  # no plain tar at all
    (compressed / "b.tar.xz").write_bytes(lzma.compress(tars[1].read_bytes()))
    for folder in (mixed, compressed):
        keys = [s["__key__"] for s in make_loader(str(folder), rank=0, world_size=1, shuffle_shards=False)]
        assert keys == want and len(want) > 2, folder


def test_corpus_stage_manifest_and_filtered_shard(tmp_path):
    from webssl_repro.data.evalsets import EVAL_SEED_BASE
    from webssl_repro.data.miniweb import sample_id
    from webssl_repro.data.shards import write_selected_shard
    from webssl_repro.data.stages import build_corpus, manifest_shards

    m = build_corpus({"n_images": 30, "shard_size": 12, "seed": 5}, str(tmp_path / "c" / "manifest.json"))
    assert m["shards"] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    paths = manifest_shards(str(tmp_path / "c" / "manifest.json"))
    keys = [s["__key__"] for s in make_loader(paths, rank=0, world_size=1, shuffle_shards=False)]
    assert keys == [sample_id(5, i) for i in range(30)]
    res = write_selected_shard(paths[1], [(keys[i], i - 12) for i in range(12, 24, 3)],
                               str(tmp_path / "heavy" / "shard-00000.tar"))
    assert res["count"] == 4
    kept = [s["__key__"] for s in make_loader(res["path"], rank=0, world_size=1)]
    assert kept == keys[12:24:3]
    with pytest.raises(ValueError, match="eval sets"):
        write_shard(str(tmp_path / "x.tar"), EVAL_SEED_BASE, 0, 1)
    # the user's shards: listed as given, and a wrong path is refused by its config key
    real = build_corpus({"shards": f"{tmp_path}/c/shard-{{00000..00002}}.tar"}, str(tmp_path / "r" / "manifest.json"))
    assert real["shards"] == paths and real["generated"] is False
    with pytest.raises(ValueError, match=r"data.shards: 1 of 4 shard\(s\) are not files.*shard-00003"):
        build_corpus({"shards": f"{tmp_path}/c/shard-{{00000..00003}}.tar"}, str(tmp_path / "r" / "manifest.json"))
    with pytest.raises(ValueError, match="data.in1k.shards"):
        build_corpus({"shards": f"{tmp_path}/nowhere/*.tar"}, str(tmp_path / "r" / "m.json"), source="in1k")
    # a misspelt "shards" is refused, not taken for a generated corpus standing in for the real one
    with pytest.raises(KeyError, match=r"data.in1k: unknown key\(s\) \['shard'\]; .* real data takes 'shards'"):
        build_corpus({"shard": f"{tmp_path}/c/shard-00000.tar"}, str(tmp_path / "r" / "m.json"), source="in1k")
