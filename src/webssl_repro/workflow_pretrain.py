"""The pretraining jobs of the DAG: each run's cluster resources and launcher, the runs imported
from released checkpoints instead, and what a target costs in GPU-hours. A part of
``workflow.Plan`` (its base class), kept apart by concept; it reads the Plan's config and grid.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
from functools import cached_property
from typing import Any, Mapping

from webssl_repro.models.arch import arch_for
from webssl_repro.paper import specs
from webssl_repro.releases import directory_only
from webssl_repro.resources import (ACTIVATION_SHARE, REFUSED_ATTEMPT, RunResources, activation_checkpointed,
                                    chain_retries, encoder_params, pretrain_resources, torchrun)
from webssl_repro.runs import Run, split_seed
from webssl_repro.settings import split_pretrain

#: The id a snakemake invocation hands its jobs (``workflow.mark_invocation``), so that a retry
#: knows which attempts are its invocation's (``train.attempts``).
INVOCATION_VAR = "WEBSSL_REPRO_INVOCATION"


class PretrainJobs:
    """Pretraining-job methods of ``workflow.Plan``."""

    config: Mapping[str, Any]

    def run_pattern(self, multinode: bool) -> str:
        """A wildcard constraint matching exactly the runs of one launch layout."""
        return _alternatives(self.runs_by_layout(multinode))

    def imported_pattern(self) -> str:
        return _alternatives([r for r in self.run_ids if not self.trained(r)])

    def import_resources(self) -> dict[str, int]:
        """A released checkpoint is converted on one node, no GPU: memory for the largest imported
        encoder three times in fp32 (as read, as converted, and written), at least 8 GB; the
        defaults where there are no GPU nodes (mini)."""
        res = self.config.get("resources", {})
        imported = [_imported_shape(split_seed(r, self.seeds[0])[0]) for r in self.run_ids if not self.trained(r)]
        if not imported or not int(res.get("gpus_per_node", 0)):
            return {}
        # a release's own architecture and resolution (it may be a size this config's grid lacks)
        params = max(encoder_params(method, dataclasses.asdict(arch_for(method, size)), px)
                     for method, size, px in imported)
        mem_mb = max(8000, math.ceil(3 * 4 * params / 2**20))
        return {"mem_mb": min(mem_mb, int(res["mem_mb_per_node"])), "cpus_per_task": int(res["cpus_per_gpu"]),
                "runtime": 120}

    def import_inputs(self, run_id: str) -> list[str]:
        """The import's inputs: none Snakemake tracks. A released checkpoint's local copy
        (``run_sources.<run>.path``) that is not there is refused here, by its key, so that the
        dry run stops and not a queued job, unless the run is imported already (a copy deleted
        since is no reason to stop). Declared as an input, it would rerun every run imported
        before it was one (Snakemake's ``input`` trigger), and all their evaluations."""
        run = split_seed(run_id, self.seeds[0])[0]
        path = self.run_sources[run].get("path")
        if path and not os.path.exists(path) and not os.path.exists(f"{self.run_dir(run_id)}/encoder.safetensors"):
            kinds = "a transformers model directory" + ("" if directory_only(run) else " or a native .pth / .pt file")
            raise FileNotFoundError(f"pretrain.run_sources.{run}.path: {path} does not exist (a local copy of "
                                    f"{self.run_sources[run].get('checkpoint')}: {kinds})")
        return []

    def import_command(self, run_id: str) -> str:
        run = split_seed(run_id, self.seeds[0])[0]
        source = self.run_sources[run]
        if "checkpoint" not in source:
            raise KeyError(f"pretrain.run_sources.{run} needs 'checkpoint' (a released id, e.g. facebook/webssl-{run})")
        path = f" --path {shlex.quote(str(source['path']))}" if source.get("path") else " --allow-download"
        return f"--checkpoint {shlex.quote(str(source['checkpoint']))}{path}"

    def pretrain_resources(self, run: str) -> RunResources:
        """Sized by the run's own recipe: a configured DINO local-crop side, MAE decoder or CLIP text
        tower changes its FLOPs."""
        r = Run.parse(split_seed(run, self.seeds[0])[0])
        return pretrain_resources(r, self.config, self.recipe(r)[0])

    def _train_section(self, r: Run) -> dict[str, Any]:
        """``pretrain.train`` for run ``r``: its ``activation_checkpointing`` patterns read as
        whether this run recomputes its blocks (``resources.activation_checkpointed``)."""
        train = dict(self.config.get("pretrain", {}).get("train", {}))
        if "activation_checkpointing" in train:
            train["activation_checkpointing"] = activation_checkpointed(self.config, r)
        return train

    def pretrain_settings_json(self, run: str) -> str:
        """How ``run`` trains (``SETTINGS["pretrain"]``: log and checkpoint cadence, recomputing
        its blocks, ...): its rule's ``--settings-json``, not a param, so changing it retrains nothing."""
        return json.dumps(split_pretrain(self.run_config(run))[1], sort_keys=True, separators=(",", ":"))

    def pretrain_job_resources(self, run: str, attempt: int) -> dict[str, Any]:
        """The rule resources of ``run``'s attempt ``attempt``: the run's own, or
        ``REFUSED_ATTEMPT`` where its guard will refuse the attempt (the ledger of this
        invocation's attempts, ``train.attempts.sized_for_attempt``)."""
        from webssl_repro.train.attempts import sized_for_attempt

        return sized_for_attempt(self._job_resources, run, self.checkpoint_dir(run), attempt,
                                 lambda: self.pretrain_resources(run).snakemake(), REFUSED_ATTEMPT)

    def pretrain_retries(self, remote: bool = False) -> int | None:
        """The pretrain rules' ``retries``: with ``resources.max_runtime_min`` set, enough for the
        longest run's chain of time-limited jobs (``CHAIN_SLACK`` more) plus ``PREEMPTION_RETRIES``;
        otherwise None (the command line's or profile's value).

        0 in Snakemake's remote mode (``workflow.remote_exec``: the snakemake inside a cluster
        job), which applies a rule's ``retries`` too: a job that stopped for its time limit or a
        preemption would be restarted in the same, ending allocation. There its failure must
        reach the submitting snakemake, which submits the next attempt as a new job."""
        if remote:
            return 0
        trained = [r for r in self.run_ids if self.trained(r)]
        if not self.config.get("resources", {}).get("max_runtime_min") or not trained:
            return None
        return chain_retries(max(self.pretrain_resources(r).jobs for r in trained))  # a 1-job run keeps 2

    @cached_property
    def trained_nodes(self) -> dict[str, int]:
        """Each trained run's node count, sized once per parse for both pretrain rules' patterns."""
        return {r: self.pretrain_resources(r).nodes for r in self.run_ids if self.trained(r)}

    def check_run_labels(self) -> None:
        """Size each trained run, as the pretrain rules' patterns do while snakemake parses them
        (``runs_by_layout``): called first, inside ``config.stop_on_config_error``, so that a label
        the config lacks ends the parse with its message alone."""
        self.trained_nodes

    def runs_by_layout(self, multinode: bool) -> list[str]:
        return [r for r, nodes in self.trained_nodes.items() if (nodes > 1) == multinode]

    def launcher(self, run: str) -> str:
        """The command prefix that starts ``python -m webssl_repro.cli`` on the run's resources.

        Ranks come from torchrun's environment; under SLURM one ``srun`` task per node
        starts one torchrun each (design.md §7), never reading SLURM_JOB_NUM_NODES. The step asks
        for the node's CPUs itself: srun of Slurm 22.05-23.02 does not take ``--cpus-per-task``
        from the batch job, and the ranks and their loader workers would share one CPU.
        ``--kill-on-bad-exit=1``: a node whose torchrun exits (a crashed worker, a bad GPU) ends
        the step, where the others would hold the allocation until NCCL's collective timeout.
        """
        res = self.pretrain_resources(run)
        if res.gpus == 0:
            return "python -m webssl_repro.cli"
        per_node = res.gpus // res.nodes
        if res.nodes == 1:
            return torchrun(f"--standalone --nnodes 1 --nproc-per-node {per_node} -m webssl_repro.cli")
        srun = f"srun --nodes {res.nodes} --ntasks {res.nodes} --ntasks-per-node 1 --cpus-per-task {res.cpus_per_task}"
        return f"{srun} --kill-on-bad-exit=1 " + torchrun(
            f"--nnodes {res.nodes} --nproc-per-node {per_node} --rdzv-backend c10d --rdzv-endpoint $(hostname):29500 "
            "--rdzv-id $SLURM_JOB_ID -m webssl_repro.cli")

    def target_message(self, item: str | None = None) -> str:
        """What a target costs, shown by the dry run: its runs and their pretraining GPU-hours
        (each pretrain job also carries its own ``gpu_hours`` resource)."""
        name = item or "all"
        if self.published:
            return f"{name}: rendered from the paper's own numbers"
        per_node = int(self.config["resources"]["gpus_per_node"])
        where = f"{per_node} GPUs/node" if per_node else \
            "resources.gpus_per_node is 0: every pretraining and evaluation job runs on CPUs"
        if per_node and "shards" not in self.config.get("data", {}):
            where += "; data.shards unset: the runs train on the generated mini-web corpus"
        message = f"{self.cost_line(item)} ({where}){self.memory_line(item)}"
        if item is None and self.skipped_items:
            message += "; not built at this scale: " + "; ".join(f"{i} ({why})" for i, why in self.skipped_items.items())
        if item is None and set(self.grid_runs) - set(self.item_runs):
            message += f"; `snakemake runs` pretrains all {len(self.grid_runs)} runs of the items"
        return message

    def cost_line(self, item: str | None = None) -> str:
        """``{item}: N runs[ (k imported)], H estimated pretraining GPU-hours``: every seed counts
        as a run; an imported run (``pretrain.run_sources``) costs no pretraining."""
        runs = [r for run in self._target_runs(item) for r in self.seeded(run)]
        imported = sum(not self.trained(r) for r in runs)
        return (f"{item or 'all'}: {len(runs)} runs{f' ({imported} imported)' if imported else ''}, "
                f"{self.gpu_hours(runs):,.0f} estimated pretraining GPU-hours")

    def _target_runs(self, item: str | None) -> list[str]:
        """The runs (without seeds) behind ``item``'s numbers, or behind every requested item's."""
        return list(self.item_runs if item is None else self.item_sources(specs.get_item(item)))

    def memory_line(self, item: str | None = None) -> str:
        """The target's trained runs whose estimated activations per GPU (``resources.activation_gb``)
        pass ``ACTIVATION_SHARE`` of ``resources.gpu_memory_gb``, and what would make them fit;
        empty where none does or the key is unset."""
        memory = self.config.get("resources", {}).get("gpu_memory_gb")
        budget = ACTIVATION_SHARE * float(memory or 0)
        fixes = {False: "add them to pretrain.train.activation_checkpointing", True: "give them more resources.nodes"}
        over: dict[bool, list[str]] = {False: [], True: []}
        for run in [r for r in self._target_runs(item) if self.trained(r)] if memory else ():
            res = self.pretrain_resources(run)
            if res.activation_gb > budget:
                over[res.recomputed].append(f"{run} ({res.activation_gb:,.0f} GB)")
        return "".join(f"; estimated activations per GPU over {ACTIVATION_SHARE:.0%} of resources.gpu_memory_gb "
                       f"({budget:,.0f} of {memory} GB){' with blocks recomputed' if recomputed else ''}: "
                       f"{', '.join(runs)}: {fixes[recomputed]}" for recomputed, runs in over.items() if runs)

    def trained(self, run_id: str) -> bool:
        """False for a run imported from a released checkpoint."""
        return split_seed(run_id, self.seeds[0])[0] not in self.run_sources

    def gpu_hours(self, runs=None) -> float:
        """Pretraining GPU-hours of ``runs`` (run ids; default all), imported ones excluded."""
        return sum(self.pretrain_resources(r).gpu_hours for r in (self.run_ids if runs is None else runs)
                   if self.trained(r))


def _imported_shape(run: str) -> tuple[str, str, int]:
    """(method, size label, largest resolution) of the checkpoint an imported run reads: a
    release's run name, or an off-the-shelf encoder's entry (trained at its own resolution)."""
    from webssl_repro.releases import OFF_THE_SHELF

    if run in OFF_THE_SHELF:
        o = OFF_THE_SHELF[run]
        return str(o["method"]), str(o["size"]), max(int(o["trained_size"]), int(o["img_size"]))
    r = Run.parse(run)
    return r.method, r.size, r.res


def _alternatives(names: list[str]) -> str:
    return "|".join(re.escape(n) for n in names) if names else "(?!)"
