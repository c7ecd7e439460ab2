"""A run's checkpoints are resumed only by the config and inputs that made them."""
from __future__ import annotations

import json

from webssl_repro.train.fingerprint import STAMP, differences, guard_checkpoints, run_fingerprint

CFG = {"run": "dino1b-full2b-224", "recipe": {"teacher_temp": 0.04, "base_lr": 0.002},
       "train": {"log_every": 5, "checkpoint_every": 50}, "seed": 0}


def _setup(tmp_path):
    data = tmp_path / "manifest.json"
    data.write_text('{"shards": ["a.tar"]}')
    ckpt = tmp_path / "checkpoints" / "dino1b-full2b-224"
    return data, ckpt


def _train(ckpt, text="step 64"):
    (ckpt / "checkpoints").mkdir(parents=True, exist_ok=True)
    (ckpt / "checkpoints" / "latest.pt").write_text(text)


def test_same_run_resumes_and_cosmetic_changes_keep_it(tmp_path):
    data, ckpt = _setup(tmp_path)
    assert guard_checkpoints(ckpt, run_fingerprint(CFG, [data])) is None
    assert json.loads((ckpt / STAMP).read_text())["config"]["recipe"]["teacher_temp"] == 0.04
    _train(ckpt)
    quieter = {**CFG, "train": {"log_every": 1, "checkpoint_every": 10}, "_workdir": "/elsewhere"}
    assert guard_checkpoints(ckpt, run_fingerprint(quieter, [str(data)])) is None
    assert (ckpt / "checkpoints" / "latest.pt").read_text() == "step 64"


def test_another_config_or_input_sets_the_checkpoints_aside(tmp_path, capsys):
    data, ckpt = _setup(tmp_path)
    guard_checkpoints(ckpt, run_fingerprint(CFG, [data]))
    _train(ckpt, "old recipe")
    hotter = {**CFG, "recipe": {**CFG["recipe"], "teacher_temp": 0.07}}
    moved = guard_checkpoints(ckpt, run_fingerprint(hotter, [data]))
    assert moved is not None and moved.parent == ckpt.parent and moved.name.startswith(ckpt.name + ".stale-")
    assert (moved / "checkpoints" / "latest.pt").read_text() == "old recipe"  # kept, not deleted
    assert sorted(p.name for p in ckpt.iterdir()) == [STAMP]  # a fresh start
    assert "config.recipe.teacher_temp" in capsys.readouterr().out

    _train(ckpt, "new recipe")
    data.write_text('{"shards": ["b.tar"]}')  # e.g. the filter kept other samples
    again = guard_checkpoints(ckpt, run_fingerprint(hotter, [data]))
    assert again is not None and again != moved and (again / "checkpoints" / "latest.pt").read_text() == "new recipe"


def test_a_parent_retrained_or_no_stamp_means_stale(tmp_path):
    data, ckpt = _setup(tmp_path)
    parent = tmp_path / "state.pt"
    parent.write_bytes(b"224 px run")
    first = run_fingerprint(CFG, [data], parent)
    guard_checkpoints(ckpt, first)
    _train(ckpt)
    parent.write_bytes(b"224 px run, retrained")
    assert "inputs.parent.size" in differences(first, run_fingerprint(CFG, [data], parent))
    assert guard_checkpoints(ckpt, run_fingerprint(CFG, [data], parent)) is not None
    (ckpt / STAMP).unlink()
    _train(ckpt)  # checkpoints from before stamps existed: nothing says whose they are
    assert guard_checkpoints(ckpt, run_fingerprint(CFG, [data], parent)) is not None


def test_precision_regenerated_shards_and_adoption(tmp_path):
    """What changes the weights is not resumed: the loop's precision (resumable mid-run, but a
    rerun for it must retrain), and a regenerated corpus whose manifest is byte-identical.
    --adopt keeps checkpoints from before stamps existed."""
    import os

    ckpt = tmp_path / "checkpoints" / "run"
    shard = tmp_path / "shard-00000.tar"
    shard.write_bytes(b"images v1")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"generated": True, "shards": [shard.name]}))
    guard_checkpoints(ckpt, run_fingerprint(CFG, [manifest]))
    _train(ckpt)
    bf16 = {**CFG, "train": {**CFG["train"], "precision": "bf16"}}
    assert guard_checkpoints(ckpt, run_fingerprint(bf16, [manifest])) is not None

    _train(ckpt)
    shard.write_bytes(b"images v2, regenerated")
    os.utime(shard, ns=(1, 1))
    assert guard_checkpoints(ckpt, run_fingerprint(bf16, [manifest])) is not None

    _train(ckpt, "from before stamps")
    (ckpt / STAMP).unlink()
    assert guard_checkpoints(ckpt, run_fingerprint(bf16, [manifest]), adopt=True) is None
    assert (ckpt / "checkpoints" / "latest.pt").read_text() == "from before stamps"
