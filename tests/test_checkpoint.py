"""The checkpoint files themselves: one version kept, a save killed half-way ignored, and the
format-1 ``latest.pt`` of earlier versions still resumed. The loop's resume arithmetic is
tested in ``test_train.py`` against the same toy method."""
from __future__ import annotations

import shutil

import pytest
import torch

from helpers_toy import GLOBAL_BATCH, Killed, ToyMethod, assert_bitwise, data_factory, make_cfg
from webssl_repro.train import latest_path, read_checkpoint, read_pointer, train
from webssl_repro.train.checkpoint import checkpoint_dir


def _names(run):
    return sorted(p.name for p in checkpoint_dir(run).iterdir())


def test_one_version_kept_and_a_killed_save_ignored_then_removed(tmp_path):
    cfg = make_cfg()  # 10 steps, a save every 3
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "run"
    train(ToyMethod(), data_factory, cfg, run, max_steps=7)
    assert _names(run) == ["latest.json", "step-7"]  # step-6 removed once step-7 was pointed to
    # a save of step 9 killed while the ranks were writing: a temporary directory, no pointer
    junk = checkpoint_dir(run) / ".step-9.tmp"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"cut short")
    assert latest_path(run) == checkpoint_dir(run) / "step-7"
    assert train(ToyMethod(init_seed=11), data_factory, cfg, run).complete
    assert _names(run) == ["latest.json", "step-10"]
    assert_bitwise(tmp_path / "straight", run)


def test_format_1_checkpoint_resumes_and_is_replaced(tmp_path):
    """A run stopped under the previous format (one ``latest.pt`` of full tensors) resumes to
    the uninterrupted run's weights; its next save is format 2 and the old file goes."""
    cfg = make_cfg()
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "old"
    train(ToyMethod(), data_factory, cfg, run, max_steps=4)
    legacy = {k: v for k, v in read_checkpoint(run).items() if k != "path"} | {"format": 1}
    shutil.rmtree(checkpoint_dir(run))
    checkpoint_dir(run).mkdir()
    torch.save(legacy, checkpoint_dir(run) / "latest.pt")
    assert read_pointer(run) is None and latest_path(run) == checkpoint_dir(run) / "latest.pt"
    with pytest.raises(Killed):
        train(ToyMethod(init_seed=8, kill_at=5), data_factory, cfg, run)
    assert _names(run) == ["latest.pt"]  # nothing saved since step 4: still the checkpoint
    assert train(ToyMethod(init_seed=9), data_factory, cfg, run).complete
    assert _names(run) == ["latest.json", "step-10"]
    assert_bitwise(tmp_path / "straight", run)
    assert read_checkpoint(run)["samples_seen"] == 10 * GLOBAL_BATCH


def test_a_save_before_the_first_step_resumes_to_the_straight_run(tmp_path):
    """``max_steps=0`` saves a fresh run: asking a stateless AdamW for its state would run an
    lr=0 step that counts, and the resumed run would bias-correct as if one step later."""
    cfg = make_cfg()
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "run"
    assert train(ToyMethod(), data_factory, cfg, run, max_steps=0).step == 0
    assert read_checkpoint(run)["with_optimizer"] is False and "optimizer" not in read_checkpoint(run)
    train(ToyMethod(init_seed=4), data_factory, cfg, run)
    assert_bitwise(tmp_path / "straight", run)


class Configured(ToyMethod):
    """A method whose state also carries its config, as MAE's and CLIP's do (``ModelOnlyState``)."""

    fields = {"noise": 0.1}

    def state_dict(self):
        return {**super().state_dict(), "config": dict(self.fields)}


class ConfiguredLater(Configured):
    fields = {"noise": 0.1, "added_by_a_later_version": 3}


def test_non_tensor_state_may_gain_keys(tmp_path):
    cfg = make_cfg()
    train(ToyMethod(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "run"
    train(Configured(), data_factory, cfg, run, max_steps=4)
    assert read_checkpoint(run)["method"]["config"] == {"noise": 0.1}
    assert train(ConfiguredLater(init_seed=2), data_factory, cfg, run).complete
    assert read_checkpoint(run)["method"]["config"] == ConfiguredLater.fields
    assert_bitwise(tmp_path / "straight", run)


class WithUnused(ToyMethod):
    """A parameter in the optimizer that never gets a gradient (a head a config leaves unused):
    AdamW never makes state for it, so the save has none."""

    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(99)
        self.model.unused = torch.nn.Parameter(torch.randn(3))
        self.teacher.unused = torch.nn.Parameter(self.model.unused.detach().clone(), requires_grad=False)


def test_a_parameter_without_gradients_resumes_to_the_straight_run(tmp_path):
    """A fresh optimizer asked for its state dict makes state for every parameter, so the
    strict load asked the save for the unused one's and failed; the resumed run now loads
    without it and, as the straight run, keeps none."""
    cfg = make_cfg()
    train(WithUnused(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "run"
    train(WithUnused(), data_factory, cfg, run, max_steps=4)
    assert "unused" not in read_checkpoint(run)["optimizer"]["state"]
    assert train(WithUnused(init_seed=3), data_factory, cfg, run).complete
    assert_bitwise(tmp_path / "straight", run)
    straight, resumed = (read_checkpoint(r)["optimizer"]["state"] for r in (tmp_path / "straight", run))
    assert set(resumed) == set(straight) and "unused" not in resumed and len(resumed) == 8


def test_a_format_1_save_with_a_parameter_without_gradients_resumes(tmp_path):
    """The same for a format-1 ``latest.pt``, whose full optimizer state has no entry either."""
    cfg = make_cfg()
    train(WithUnused(), data_factory, cfg, tmp_path / "straight")
    run = tmp_path / "old"
    train(WithUnused(), data_factory, cfg, run, max_steps=4)
    legacy = {k: v for k, v in read_checkpoint(run).items() if k != "path"} | {"format": 1}
    assert "unused" not in legacy["optimizer"]["state"]
    shutil.rmtree(checkpoint_dir(run))
    checkpoint_dir(run).mkdir()
    torch.save(legacy, checkpoint_dir(run) / "latest.pt")
    assert train(WithUnused(init_seed=3), data_factory, cfg, run).complete
    assert_bitwise(tmp_path / "straight", run)
    assert "unused" not in read_checkpoint(run)["optimizer"]["state"]


def test_a_pointer_cut_short_names_its_file(tmp_path):
    """A checkpoint pointer or a stamp edited or cut short names its file and line; json alone
    says only 'Expecting value: line 1 column 1'."""
    from webssl_repro.train import read_pointer
    from webssl_repro.train.checkpoint import POINTER, checkpoint_dir

    checkpoint_dir(tmp_path).mkdir()
    (checkpoint_dir(tmp_path) / POINTER).write_text('{"step": 4, "path":')
    with pytest.raises(ValueError, match=r"latest.json: not valid JSON at line 1, column 20"):
        read_pointer(tmp_path)


@pytest.mark.parametrize("part", ["meta.pt", "__0_0.distcp"])
def test_a_save_cut_short_names_itself_and_says_what_to_do(tmp_path, part):
    """A checkpoint file cut short (a full disk, a copy interrupted) stops the resume with the
    save's path, not torch's zip-reader or DCP traceback; it is the only save kept."""
    cfg = make_cfg()
    train(ToyMethod(), data_factory, cfg, tmp_path, max_steps=4)
    (cut,) = checkpoint_dir(tmp_path).glob(f"step-*/{part}")
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"step-4: a saved checkpoint that cannot be read \(.*\); it is the only "
                                         r"one kept: move .*checkpoints aside \(its pointer names this save\)"):
        train(ToyMethod(), data_factory, cfg, tmp_path)
    checkpoint_dir(tmp_path).rename(tmp_path / "aside")  # as the message says: the run starts afresh
    assert train(ToyMethod(), data_factory, cfg, tmp_path).complete


def test_a_save_is_durable_before_the_pointer_names_it(tmp_path, monkeypatch):
    """In a node crash a pointer must not outlive what it names: the step directory's files
    (meta.pt written and fsync-ed as the shards are) and its rename are synced before the
    pointer is written, and the previous save removed only once the pointer's entry is synced."""
    from webssl_repro.train import checkpoint

    events = []
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda path: events.append(("fsync", path.name)))
    write_json = checkpoint.write_json
    monkeypatch.setattr(checkpoint, "write_json", lambda path, obj: events.append(("pointer", obj["dir"]))
                        or write_json(path, obj))
    atomic_write = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, write: events.append(("atomic", path.name))
                        or atomic_write(path, write))
    from webssl_repro.train.logging import TrainLogger

    sync = TrainLogger.sync  # the log's lines up to the step: a resume does not write them again
    monkeypatch.setattr(TrainLogger, "sync", lambda self: events.append(("log", self.path.name)) or sync(self))
    train(ToyMethod(), data_factory, make_cfg(checkpoint_every=100, samples_seen=2 * GLOBAL_BATCH, warmup_steps=1), tmp_path)
    assert events == [("log", "train_log.jsonl"), ("atomic", "meta.pt"), ("fsync", ".step-2.tmp"),
                      ("fsync", "checkpoints"),
                      ("pointer", "step-2"), ("fsync", "checkpoints")]  # the pointer, then old saves go
