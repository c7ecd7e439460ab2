"""Classic probes that stop at their time limit and resume (evaluate/progress.py): the ImageNet
feature pass and linear grid, a dense probe's training and its scoring, stopped mid-way and
resumed, end with the scores of an uninterrupted job; finished parts are read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_mini import tiny_data  # noqa: F401  (fixture)
from helpers_progress import StopAfter, iterations_run
from test_classic_streaming import DENSE, _encoder


@pytest.mark.parametrize("task,augment,stop_after", [("segmentation", True, 5), ("depth", False, 5), ("depth", False, 8)],
                         ids=["segmentation-augmented", "depth-cached", "depth-before-scoring"])
def test_dense_probe_stopped_and_resumed_scores_as_uninterrupted(tiny_data, tmp_path, task, augment,  # noqa: F811
                                                                 stop_after):
    """8 iterations, stopped after the 5th, or after the 8th, when the trained heads are saved
    before the (unsaved) scoring."""
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    encoder, meta = _encoder()
    cfg = classic.classic_config({**DENSE, task: {**DENSE[task], "iters": 8, "augment": augment}})
    whole = getattr(classic, task)(encoder, meta, tiny_data[task], cfg)

    state = tmp_path / "state"
    deadline = StopAfter(stop_after)
    with pytest.raises(Preempted, match="time limit .* after " + ("iteration 5 of" if stop_after == 5 else "training")):
        with EvalProgress(state, checkpoint_every_min=0, deadline=deadline) as progress:
            getattr(classic, task)(encoder, meta, tiny_data[task], cfg, progress)
    pointer = next(state.glob(f"{task}*.json"))
    assert json.loads(pointer.read_text())["iteration"] == stop_after
    assert deadline.saves == stop_after  # after every iteration up to the stop (checkpoint_every_min 0)
    assert len([p for p in state.iterdir() if p.is_dir()]) == 1  # the older states are removed

    torch.manual_seed(123)  # a retry starts in a new process: its RNG is restored, not inherited
    retry = EvalProgress(state, checkpoint_every_min=0)
    seen = iterations_run(retry)
    resumed = getattr(classic, task)(encoder, meta, tiny_data[task], cfg, retry)
    assert resumed == whole
    # the retry trained only the iterations after the stop (a restart would count from 1)
    assert [done for part, done in seen if not part.endswith("-scores")] == list(range(stop_after + 1, 9))
    if task == "segmentation":  # the part's scores are kept, its training state dropped
        assert not list(state.glob("segmentation*.json")) and list((state / "done").glob("segmentation*.json"))


def _stopped_while_scoring(task: str, part: str, data: str, state):
    """``task`` trained for 8 iterations and scored on 64 val images in batches of 16, whole, and
    stopped after the 2nd scoring batch (checks: 7 after training iterations, 1 after the last,
    then 1 after each scoring batch but the last). Returns what a retry needs and the whole result."""
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    encoder, meta = _encoder()
    cfg = classic.classic_config({**DENSE, "batch_size": 16, task: {**DENSE[task], "iters": 8}})
    whole = getattr(classic, task)(encoder, meta, data, cfg)
    with pytest.raises(Preempted, match=f"after iteration 2 of {part}"):
        with EvalProgress(state, checkpoint_every_min=0, deadline=StopAfter(10)) as progress:
            getattr(classic, task)(encoder, meta, data, cfg, progress)
    assert json.loads((state / f"{part}.json").read_text())["iteration"] == 2
    return (encoder, meta, data, cfg), whole


def test_segmentation_stopped_while_scoring_resumes_at_the_next_image(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The retry loads the trained heads and the counts of the first 32 images, and scores only
    the other 32 to the uninterrupted mIoU."""
    from webssl_repro.evaluate import classic, segmentation
    from webssl_repro.evaluate.progress import EvalProgress

    state = tmp_path / "state"
    args, whole = _stopped_while_scoring("segmentation", "segmentation-32x32-scores", tiny_data["segmentation"], state)
    assert json.loads((state / "segmentation-32x32.json").read_text())["iteration"] == 8

    scored, predict = [], segmentation.predict
    monkeypatch.setattr(segmentation, "predict", lambda head, fn, x, *a, **kw: scored.append(1) or
                        predict(head, fn, x, *a, **kw))
    resumed = classic.segmentation(*args, EvalProgress(state))
    assert resumed == whole and len(scored) == 2 * 32  # two heads, the 32 images not yet scored
    assert not list(state.glob("segmentation*.json")) and not [p for p in state.iterdir() if p.is_dir()
                                                                 and p.name != "done"]


def test_depth_stopped_while_scoring_resumes_at_the_next_image(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """NYUd the same way: the retry adds only the other 32 images' RMSEs, to the uninterrupted RMSE."""
    from webssl_repro.evaluate import classic, depth
    from webssl_repro.evaluate.progress import EvalProgress

    state = tmp_path / "state"
    args, whole = _stopped_while_scoring("depth", "depth-scores", tiny_data["depth"], state)

    scored, add = [], depth.RMSE.add
    monkeypatch.setattr(depth.RMSE, "add", lambda self, p, *a: scored.append(len(p)) or add(self, p, *a))
    resumed = classic.depth(*args, EvalProgress(state))
    assert resumed == whole and sum(scored) == 2 * 32  # two heads, the 32 images not yet scored


def test_every_scoring_batch_counts_in_the_stop_decision(tiny_data, monkeypatch):  # noqa: F811
    """The deadline learns each scoring batch's time, the first one's too (it follows the
    heads' training, whose iterations are far shorter at paper scale). Fake clock: each
    prediction takes 10 s, so each batch of 16 images and two heads takes 320 s."""
    from webssl_repro.evaluate import classic, segmentation
    from webssl_repro.evaluate.progress import EvalProgress

    class Recorder(StopAfter):
        def __init__(self):
            super().__init__(10**9)
            self.steps = []

        def record_step(self, seconds):
            self.steps.append(seconds)

    now, predict = [0.0], segmentation.predict

    def slow_predict(*a, **kw):
        now[0] += 10.0
        return predict(*a, **kw)

    monkeypatch.setattr(segmentation, "predict", slow_predict)
    encoder, meta = _encoder()
    cfg = classic.classic_config({**DENSE, "batch_size": 16, "segmentation": {**DENSE["segmentation"], "iters": 3}})
    deadline = Recorder()
    classic.segmentation(encoder, meta, tiny_data["segmentation"], cfg,
                         EvalProgress(None, deadline=deadline, clock=lambda: now[0]))
    assert deadline.steps == [0.0, 0.0] + [320.0] * 4  # training iterations 2-3, then all 4 scoring batches


def test_features_of_the_earlier_layout_move_under_files(tmp_path):
    """A directory from before files/ existed keeps its saved feature rows; set aside, it
    loses them as a directory of the new layout does."""
    from webssl_repro.evaluate.progress import EvalProgress

    settings = {"checkpoint_every_min": 30.0, "stop_margin_s": 300.0}
    for name in ("kept", "aside"):  # stamped, then features written in the old place
        EvalProgress.open(tmp_path / name, {"config": "a"}, settings, env={})
        (tmp_path / name / "linear_features" / "train").mkdir(parents=True)
        (tmp_path / name / "linear_features" / "train" / "rows.f32").write_bytes(bytes(64))
    EvalProgress.open(tmp_path / "kept", {"config": "a"}, settings, env={})
    assert (tmp_path / "kept" / "files" / "linear_features" / "train" / "rows.f32").stat().st_size == 64
    assert not (tmp_path / "kept" / "linear_features").exists() and not list(tmp_path.glob("kept.stale-*"))
    EvalProgress.open(tmp_path / "aside", {"config": "b"}, settings, env={})
    (aside,) = tmp_path.glob("aside.stale-*")
    assert not any(aside.rglob("rows.f32"))


@pytest.mark.parametrize("stop_after,part,iteration", [(2, "features.train", 2), (5, "features.val", 1),
                                                       (10, "classification", 4)],
                         ids=["train-features", "val-features", "linear-grid"])
def test_linear_eval_stopped_and_resumed_scores_as_uninterrupted(tiny_data, tmp_path, stop_after, part,  # noqa: F811
                                                                 iteration):
    """320 train and 160 val images in batches of 64, then 40 iterations of the grid: stopped
    after the 2nd train batch, the 1st val batch or the grid's 4th iteration, the retry
    continues from there, writes no row twice and ends with the uninterrupted numbers."""
    from webssl_repro.evaluate import classic, classification, features
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    encoder, meta = _encoder()
    cfg = classic.classic_config(DENSE)
    whole = classification.classification(encoder, meta, tiny_data["classification"], cfg)

    state = tmp_path / "state"
    with pytest.raises(Preempted, match=f"after iteration {iteration} of {part}"):
        with EvalProgress(state, checkpoint_every_min=60, deadline=StopAfter(stop_after)) as progress:
            classification.classification(encoder, meta, tiny_data["classification"], cfg, progress)
    saved = torch.load(state / json.loads((state / f"{part}.json").read_text())["dir"] / "state.pt",
                       weights_only=False)
    if part.startswith("features"):
        assert saved["rows"] == 64 * iteration
    assert sorted(p.name for p in (state / "done").glob("features.*")) == \
        [f"features.{s}.json" for s in ("train", "val")[:stop_after // 5 + (part == "classification")]]

    seen, steps = [], []
    passes, probe = features.block_tokens, classification.linear_probe

    def counted_probe(*args, checkpoint, **kw):
        return probe(*args, checkpoint=lambda done, make: steps.append(done) or checkpoint(done, make), **kw)

    with pytest.MonkeyPatch.context() as mp:  # count the images the retry encodes, the grid iterations it trains
        mp.setattr(features, "block_tokens", lambda m, x, **kw: seen.append(len(x)) or passes(m, x, **kw))
        mp.setattr(classification, "linear_probe", counted_probe)
        resumed = classification.classification(encoder, meta, tiny_data["classification"], cfg,
                                                EvalProgress(state, checkpoint_every_min=60))
    assert resumed == whole
    assert sum(seen) == {"features.train": 320 - 128 + 160, "features.val": 160 - 64, "classification": 0}[part]
    assert steps == list(range(5 if part == "classification" else 1, 41))


def test_a_feature_pass_continues_at_its_saved_row_whatever_the_batch(tiny_data, tmp_path):  # noqa: F811
    """The rows a save records, not its batches, say where a retry starts: with another
    batch size it writes the rest, and an uninterrupted pass's features are what it ends with;
    ``scratch`` keeps the features out of the state directory."""
    from webssl_repro.evaluate import classic, classification
    from webssl_repro.evaluate.imagesets import EvalImages, load_split
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    encoder, meta = _encoder()
    images = EvalImages(load_split(tiny_data["classification"], "train"), int(meta["img_size"]), "label")
    cfg = classic.classic_config(DENSE)
    whole = classification.split_features(encoder, images, 4, cfg, EvalProgress(tmp_path / "a"), "train",
                                          tmp_path / "a" / "files")
    with pytest.raises(Preempted):
        with EvalProgress(tmp_path / "b", deadline=StopAfter(3)) as progress:
            classification.split_features(encoder, images, 4, cfg, progress, "train", tmp_path / "b" / "files")
    resumed = classification.split_features(encoder, images, 4, {**cfg, "batch_size": 48},
                                            EvalProgress(tmp_path / "b"), "train", tmp_path / "b" / "files")
    assert torch.equal(resumed["labels"], whole["labels"])
    for key in ("cls", "avgpool"):
        assert resumed[key].dtype == torch.float32
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-5)

    state = tmp_path / "c"
    classification.classification(encoder, meta, tiny_data["classification"], {**cfg, "scratch": str(tmp_path)},
                                  EvalProgress(state))
    assert not (state / "files").exists() and not list(state.glob("done/features.*"))


@pytest.mark.parametrize("damage", ["deleted", "other-dtype"])
def test_a_saved_row_count_without_its_files_starts_the_pass_over(tiny_data, tmp_path, monkeypatch, damage):  # noqa: F811
    """A save says 128 rows are written, but the folder was deleted, or the files are of
    another store (float16 past a smaller memory limit): the retry writes every row anew and
    drops the count, so that a later retry cannot trust it either."""
    from webssl_repro.evaluate import classic, classification, features
    from webssl_repro.evaluate.imagesets import EvalImages, load_split
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    encoder, meta = _encoder()
    images = EvalImages(load_split(tiny_data["classification"], "train"), int(meta["img_size"]), "label")
    cfg = classic.classic_config(DENSE)
    state, folder = tmp_path / "state", tmp_path / "state" / "files"
    with pytest.raises(Preempted):
        with EvalProgress(state, deadline=StopAfter(2)) as progress:
            classification.split_features(encoder, images, 4, cfg, progress, "train", folder)
    assert json.loads((state / "features.train.json").read_text())["iteration"] == 2
    if damage == "deleted":
        import shutil
        shutil.rmtree(folder)
    else:
        monkeypatch.setattr(features, "IN_MEMORY_BYTES", 0)
    seen, passes = [], features.block_tokens

    def crash_at_the_second_batch(m, x, **kw):
        seen.append(len(x))
        if len(seen) == 2:
            raise RuntimeError("node failure")
        return passes(m, x, **kw)

    monkeypatch.setattr(features, "block_tokens", crash_at_the_second_batch)
    with pytest.raises(RuntimeError, match="node failure"):  # the next retry dies before its first save
        classification.split_features(encoder, images, 4, cfg, EvalProgress(state, checkpoint_every_min=60),
                                      "train", folder)
    assert not (state / "features.train.json").exists()
    feats = classification.split_features(encoder, images, 4, cfg, EvalProgress(state), "train", folder)
    assert sum(seen) == 2 * 64 + 320 and int((feats["labels"] >= 0).sum()) == 320
    assert (folder / ("linear_features.f16" if damage == "other-dtype" else "linear_features.f32")).exists()


def test_the_features_are_removed_once_the_linear_eval_is_kept(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The split features (52 GB at ViT-7B) do not stay in the state directory through the
    dense probes, which run for hours after the linear grid."""
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate.classification import FEATURES
    from webssl_repro.evaluate.progress import EvalProgress

    encoder, meta = _encoder()
    seen = []
    folder = EvalProgress(tmp_path).files(FEATURES)
    monkeypatch.setattr(classic, "segmentation", lambda *a: seen.append(folder.exists()) or {})
    monkeypatch.setattr(classic, "depth", lambda *a: {})
    metrics = classic.run_classic(encoder, meta, tiny_data, DENSE, EvalProgress(tmp_path))
    assert seen == [False] and metrics["in1k_linear"] > 0 and folder.parent.is_dir()
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == \
        ["classification.json", "depth.json", "features.train.json", "features.val.json"]


def test_finished_parts_are_read_back_not_recomputed(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from webssl_repro.evaluate import classic
    from webssl_repro.evaluate.progress import EvalProgress

    encoder, meta = _encoder()
    progress = EvalProgress(tmp_path)
    progress.finish("classification", {"in1k_linear": 12.5})
    progress.finish("depth", {"nyud_lin1": 0.5, "nyud_lin4": 0.25})

    def refuse(*args, **kwargs):
        raise AssertionError("a finished part was recomputed")

    monkeypatch.setattr(classic, "classification", refuse)
    monkeypatch.setattr(classic, "depth", refuse)
    cfg = {**DENSE, "segmentation": {**DENSE["segmentation"], "iters": 2}}
    metrics = classic.run_classic(encoder, meta, tiny_data, cfg, progress)
    assert metrics["in1k_linear"] == 12.5 and metrics["nyud_lin4"] == 0.25
    assert set(metrics) == {"in1k_linear", "ade20k_linear", "ade20k_ms", "nyud_lin1", "nyud_lin4"}


def test_an_unreadable_dense_set_stops_the_job_before_imagenet(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """ADE20K given as a hub dataset with a loading script: the classic job stops at its start,
    naming the key, instead of after the linear probe (a day at ViT-7B) that runs first."""
    pytest.importorskip("datasets")
    from webssl_repro.data.real_evalsets import build_hf_manifest
    from webssl_repro.evaluate import classic

    scripted = tmp_path / "scene_parse_150"
    scripted.mkdir()
    (scripted / "scene_parse_150.py").write_text("import datasets\n")
    manifest = tmp_path / "segmentation.json"
    manifest.write_text(json.dumps(build_hf_manifest("segmentation", {"dataset": str(scripted)})))
    ran = []
    monkeypatch.setattr(classic, "classification", lambda *a, **k: ran.append("classification") or {})
    encoder, meta = _encoder()
    data = {**tiny_data, "segmentation": str(manifest)}
    with pytest.raises(ValueError, match=r"data.evalsets.segmentation.dataset: .*with a loading script"):
        classic.run_classic(encoder, meta, data, DENSE)
    assert ran == []
    empty = tmp_path / "depth.json"
    depth = json.loads(Path(tiny_data["depth"]).read_text())
    empty.write_text(json.dumps({**depth, "splits": {"train": {}, "val": {}}}))
    with pytest.raises(ValueError, match=r"no single 'train' split"):
        classic.run_classic(encoder, meta, {**tiny_data, "depth": str(empty)}, DENSE)
    assert ran == []
