"""The shared training loop over two gloo ranks (DDP and FSDP2) against one process, on the
toy method of helpers_toy.py.

Run as a script under torchrun, this file is also the 2-rank DDP / FSDP2 worker.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_dist import rerun_if_aborted, torchrun, worker_env
from helpers_toy import DIM, HIDDEN, ToyMethod, data_factory, final_tensors, make_cfg
from webssl_repro.train import read_log, train


def _worker(out: Path) -> None:
    """Per rank: a DDP run, and an FSDP2 run stopped after 3 steps and resumed fresh.

    Each rank initialises differently: the loop must start every rank from rank 0's weights.
    Under FSDP2 rank 1 builds its method on the meta device, without values, as ``pretrain``
    does (``shard_receiver``): its shards can only come from rank 0.
    """
    rank = int(os.environ["RANK"])
    cfg = make_cfg(strategy="ddp")
    train(ToyMethod(noise=0.0, init_seed=rank), data_factory, cfg, out / "ddp")
    cfg = make_cfg(strategy="fsdp2")
    with torch.device("meta") if rank else contextlib.nullcontext():
        method = ToyMethod(noise=0.0, init_seed=rank)
    assert method.model.inp.weight.is_meta == (rank == 1)
    assert train(method, data_factory, cfg, out / "fsdp2", max_steps=3).step == 3
    with torch.device("meta") if rank else contextlib.nullcontext():
        method = ToyMethod(noise=0.0, init_seed=99)
    train(method, data_factory, cfg, out / "fsdp2")
    from torch.distributed.tensor import DTensor

    assert isinstance(method.model.inp.weight, DTensor) and isinstance(method.teacher.out.weight, DTensor)
    _stop_at_one_ranks_time_limit(out / "limit", rank)
    torch.distributed.destroy_process_group()


class _Clock:
    """10 s per batch drawn: a job ending at 75 s with a 20 s margin stops after step 6."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def data(self, start_sample, rank, world_size):
        for batch in data_factory(start_sample, rank, world_size):
            self.now += 10.0
            yield batch


def _stop_at_one_ranks_time_limit(out: Path, rank: int) -> None:
    """Only rank 1 reads the time limit (as one node's clock may reach it a step before rank 0's):
    each rank's ``Preempted`` names the time limit, which rank 0 records for ``launch``."""
    from webssl_repro.train import Preempted
    from webssl_repro.train.deadline import Deadline

    clock = _Clock()
    limit = Deadline(end_time=75.0, margin_s=20.0, clock=clock) if rank == 1 else None
    try:
        train(ToyMethod(noise=0.0), clock.data, make_cfg(strategy="ddp", checkpoint_every=100), out, deadline=limit)
    except Preempted as err:
        (out / f"cause-{rank}.txt").write_text(f"{err.cause} after step {err.step}")


def _two_ranks(out: Path) -> subprocess.CompletedProcess:
    for strategy in ("ddp", "fsdp2", "limit"):  # a rerun starts from scratch, not from a crashed run's checkpoints
        shutil.rmtree(out / strategy, ignore_errors=True)
    return subprocess.run(torchrun(2, __file__, str(out)), env=worker_env(), capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    train(ToyMethod(noise=0.0), data_factory, make_cfg(), out / "single")
    proc = rerun_if_aborted(_two_ranks(out), lambda: _two_ranks(out), "two-rank gloo run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_gloo_matches_single_process(two_rank_runs, strategy):
    single, ref = final_tensors(two_rank_runs / "single")
    multi, got = final_tensors(two_rank_runs / strategy)
    assert multi["world_size"] == 2 and multi["step"] == 10 and multi["method"]["ema_updates"] == 10
    init = ToyMethod(noise=0.0).model.state_dict()
    assert max((ref[f"model.{k}"] - v).abs().max().item() for k, v in init.items()) > 1e-2  # weights moved
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].shape == got[k].shape, k  # read back whole, unsharded
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=1e-5, msg=k)
    if strategy == "fsdp2":  # each rank wrote its own half of every sharded tensor, none gathered
        stored = torch.distributed.checkpoint.FileSystemReader(multi["path"]).read_metadata().storage_data
        halves = {"model.inp.weight": HIDDEN // 2, "optimizer.state.inp.weight.exp_avg": HIDDEN // 2,
                  "method.teacher.out.weight": DIM // 2}  # row offset of rank 1's shard
        for key, half in halves.items():
            chunks = sorted((index.offset[0], info.relative_path) for index, info in stored.items() if index.fqn == key)
            assert chunks == [(0, "__0_0.distcp"), (half, "__1_0.distcp")], (key, chunks)
    single_log, multi_log = read_log(two_rank_runs / "single"), read_log(two_rank_runs / strategy)
    assert [r["loss"] for r in multi_log] == pytest.approx([r["loss"] for r in single_log], abs=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_a_time_limit_one_rank_reaches_is_every_ranks_stop_cause(two_rank_runs):
    assert [(two_rank_runs / "limit" / f"cause-{r}.txt").read_text() for r in (0, 1)] == ["time limit after step 6"] * 2
