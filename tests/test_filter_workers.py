"""Filter jobs with loader workers (``data.filter.workers``): the backend's CPU side runs in the
workers, and the job decides and counts exactly as one process does."""
from __future__ import annotations

import pytest

from webssl_repro.data.corpus import read_manifest
from webssl_repro.data.loader import make_loader
from webssl_repro.data.stages import build_corpus, filter_corpus, manifest_shards


def _ids(result_json):
    return [s["meta"]["id"] for s in make_loader(read_manifest(result_json)["shards"], shuffle_shards=False,
                                                 rank=0, world_size=1)]


def test_workers_keep_what_one_process_keeps_and_count_every_readers_skips(tmp_path, monkeypatch):
    """Also where Python starts workers by forkserver (Linux's default from 3.14): the collate
    holds the OCR backend's ONNX session, which cannot be pickled, so the workers are forked."""
    import multiprocessing

    man = str(tmp_path / "shards" / "manifest.json")
    build_corpus({"n_images": 12, "shard_size": 4, "seed": 3,
                  "kinds": {"objects": 0.4, "text_scene": 0.3, "chart": 0.3}}, man)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    shards = [*manifest_shards(man), str(junk)]  # 2 workers: shards 0, 2 and shard 1, junk
    with pytest.warns(RuntimeWarning, match="skipping broken shard"):
        one = filter_corpus("heavy", {"backend": "ocr", "max_broken_shards": 1}, shards,
                            str(tmp_path / "one" / "heavy.json"))
    # the junk shard is read in a worker process: its count reaches the result all the same
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "forkserver")
    two = filter_corpus("heavy", {"backend": "ocr", "workers": 2, "max_broken_shards": 1}, shards,
                        str(tmp_path / "two" / "heavy.json"))
    assert (two["n"], two["broken_shards"], two["skipped_samples"]) == (one["n"], one["broken_shards"], 0) == (12, 1, 0)
    for key in ("n_kept", "tp", "fp", "fn"):
        assert two[key] == one[key], key
    assert 0 < two["n_kept"] < 12
    assert _ids(tmp_path / "two" / "heavy.json") == _ids(tmp_path / "one" / "heavy.json")


def test_paper_filter_jobs_ask_for_a_cpu_per_worker_and_their_gpus_share_of_a_node():
    """The share of a 480 GB node of 8 GPUs: 60 GB for SmolVLM2's weights and 7 loader workers,
    not the profile's default 16 GB."""
    from webssl_repro.workflow import Plan, shipped_plan

    paper = shipped_plan("paper")
    assert paper.config["data"]["filter"]["workers"] == 7
    assert paper.filter_resources() == {"gpu": 1, "runtime": 720, "nodes": 1, "mem_mb": 60000, "cpus_per_task": 8}
    more = {**paper.config, "data": {**paper.config["data"], "filter": {**paper.config["data"]["filter"], "workers": 15}}}
    assert Plan(more).filter_resources()["cpus_per_task"] == 16  # more workers than the GPU's CPUs
    assert paper.filter_resources(whole=True) == {}  # the merge of the parts: a local listing
    assert "cpus_per_task" not in shipped_plan("mini").filter_resources()  # in-process: one CPU


@pytest.mark.parametrize("first_token", ["yes", "no"])
def test_mllm_processor_runs_in_the_workers(tmp_path, monkeypatch, first_token):
    """The tiny SmolVLM-architecture model answers every image with ``first_token``; the workers
    make its processor tensors (``encode``), and the job process only generates."""
    from helpers_mllm import tiny_mllm
    from webssl_repro.data.filter_mllm import MLLMFilter

    man = str(tmp_path / "shards" / "manifest.json")
    build_corpus({"n_images": 6, "shard_size": 2, "seed": 5}, man)
    section = {"backend": "mllm", "model": tiny_mllm(tmp_path / "model", first_token), "batch_size": 2,
               "max_new_tokens": 1, "workers": 2}
    made_here = []  # what a worker process appends stays in its own copy
    inputs = MLLMFilter._inputs
    monkeypatch.setattr(MLLMFilter, "_inputs", lambda self, *a: made_here.append(len(a[0])) or inputs(self, *a))
    res = filter_corpus("light", section, manifest_shards(man), str(tmp_path / "f" / "light.json"))
    assert (res["n"], res["n_kept"], res["broken_shards"]) == (6, 6 if first_token == "yes" else 0, 0)
    assert made_here == []  # 6 decisions, none of whose inputs this process made
    in_process = filter_corpus("light", {**section, "workers": 0}, manifest_shards(man), str(tmp_path / "g" / "l.json"))
    assert made_here == [2, 2, 2] and in_process["n_kept"] == res["n_kept"]


def test_mllm_batches_never_span_a_shard_so_workers_and_chunks_decide_alike(tmp_path, monkeypatch):
    """A batched MLLM's numbers depend on its batch (left padding to the longest prompt), so
    ``workers`` and ``checkpoint_shards``, which say how a job runs, must not change what is
    batched with what. The stand-in answers "yes" for the images brighter than their batch's
    mean: 3 shards of 5 images in batches of 2 are decided alike in one process, by 2 workers
    and chunk by chunk, and every batch holds images of one shard (2, 2, 1 per shard)."""
    import numpy as np

    from webssl_repro.data.filter_mllm import MLLMFilter

    man = str(tmp_path / "shards" / "manifest.json")
    build_corpus({"n_images": 15, "shard_size": 5, "seed": 2}, man)
    made = []  # batch sizes made in this process (a worker's appends stay in its copy)

    def inputs(self, images, prompt):
        made.append(len(images))
        return [float(np.asarray(im, dtype=np.float64).mean()) for im in images]

    def generate(self, brightness):
        return ["yes" if b > sum(brightness) / len(brightness) else "no" for b in brightness]

    monkeypatch.setattr(MLLMFilter, "_inputs", inputs)
    monkeypatch.setattr(MLLMFilter, "_generate", generate)
    section = {"backend": "mllm", "model": str(tmp_path), "batch_size": 2}
    shards = manifest_shards(man)
    runs = {name: filter_corpus("light", {**section, **extra}, shards, str(tmp_path / name / "light.json"))
            for name, extra in [("one", {}), ("workers", {"workers": 2}), ("chunks", {"checkpoint_shards": 2})]}
    assert made == [2, 2, 1] * 3 * 2  # in this process: "one" and "chunks"
    kept = {name: _ids(tmp_path / name / "light.json") for name in runs}
    assert kept["workers"] == kept["chunks"] == kept["one"] and 3 <= len(kept["one"]) <= 9, kept
    assert {r["n"] for r in runs.values()} == {15}
