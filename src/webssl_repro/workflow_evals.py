"""The evaluation jobs of the DAG: what each eval rule reads, how it is launched and what it
asks the cluster for. A part of ``workflow.Plan`` (its base class), kept apart by concept; it
reads the Plan's config, paths and scale.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from webssl_repro.metrics import BLIND, CATEGORY_COLUMNS, CLASSIC_METRICS, NO_IMAGE, VQA_BENCHMARKS, VQA_CONTROLS
from webssl_repro.resources import REFUSED_ATTEMPT, lm_gpus, method_arch, node_share, torchrun
from webssl_repro.settings import SETTINGS, split_settings


class EvalJobs:
    """Evaluation-job methods of ``workflow.Plan``."""

    config: Mapping[str, Any]

    def vqa_data(self) -> list[str]:
        """The mini probe reads the mini-web VQA sets and corpus captions; a real LM reads
        Cambrian and the 16 benchmarks located by ``evaluate.vqa.data`` instead."""
        if self.config.get("evaluate", {}).get("vqa", {}).get("language_model", "tiny") != "tiny":
            return []
        return [self.evalset("vqa"), self.data_manifest("shards")]

    def vqa_controls(self) -> list[str]:
        """The VQA probe's control encoders this scale runs (``evaluate.vqa.controls``, and only
        where the vqa stage runs)."""
        wanted = self.config.get("evaluate", {}).get("vqa", {}).get("controls", False)
        return list(VQA_CONTROLS) if wanted and "vqa" in self.stages else []

    def control_pattern(self) -> str:
        """The ``vqa_control`` rule's wildcard constraint."""
        return "|".join(VQA_CONTROLS)

    def control_path(self, control: str) -> str:
        """One folder per control: the VQA stage keeps its feature cache beside its output."""
        return f"{self.results}/controls/{control}/vqa.json"

    def control_probe_path(self, control: str) -> str:
        """The VQA probe trained on a control encoder (``vqa.trained``), beside its answers."""
        return f"{self.results}/controls/{control}/vqa_probe"

    def vqa_probe_path(self, run: str) -> str:
        """A run's trained VQA probe (``vqa.trained``): the ``vqa`` job answers with it, so that
        a change to the answering alone (``vqa.config.ANSWER_KEYS``) does not train it again."""
        return f"{self.results}/evals/{run}/vqa_probe"

    def no_image_answers(self) -> list[str]:
        """The best answers to the classic tasks that ignore the image (``evaluate.no_image``),
        wherever this scale runs the classic probes: what their numbers must clear."""
        return [f"{self.results}/controls/{NO_IMAGE}/classic.json"] if "classic" in self.stages else []

    def no_image_inputs(self, metrics) -> list[str]:
        """The answers without the image an item with ``metrics`` is rendered beside: the classic
        tasks' best, and the VQA probe's on zero image tokens where this scale runs the controls."""
        inputs = self.no_image_answers() if any(m in CLASSIC_METRICS for m in metrics) else []
        if BLIND in self.vqa_controls() and any(m in VQA_BENCHMARKS or m in CATEGORY_COLUMNS for m in metrics):
            inputs.append(self.control_path(BLIND))
        return inputs

    def _alignment(self) -> Mapping[str, Any]:
        return self.config.get("evaluate", {}).get("alignment", {})

    def language_features_path(self, lm: str) -> str:
        """One language model's features of the alignment captions, read by every run's alignment job."""
        return f"{self.results}/language_features/{lm}.pt"

    def language_features_paths(self) -> list[str]:
        """The ``alignment`` rule's LM features: one file per ``evaluate.alignment.language_models``."""
        return [self.language_features_path(lm) for lm in self.language_models()]

    def language_model_pattern(self) -> str:
        """The ``language_features`` rule's wildcard constraint: this scale's language models."""
        return "|".join(re.escape(lm) for lm in self.language_models())

    def language_weights(self, lm: str) -> list[str]:
        """A local copy's weight files, as the ``language_features`` rule's inputs: Snakemake
        computes its features again when they are replaced. None for a hub id, nor for a path
        that this host does not see (a dry run off the cluster; the job says it is missing)."""
        from webssl_repro.evaluate.alignment_eval import lm_source, weight_files

        try:
            source = lm_source(lm, {"lm_paths": self._alignment().get("lm_paths", {})})
        except ValueError:
            return []
        return [str(p) for p in weight_files(source)]

    def language_features_json(self, lm: str) -> str:
        """What the ``language_features`` job for ``lm`` computes from (its params): which
        weights the name loads, at which pinned revision. Not ``k``, ``q`` or the other LMs,
        which only the score reads."""
        from webssl_repro.files import lm_entry

        paths = self._alignment().get("lm_paths", {})
        section: dict[str, Any] = {"lm_paths": {lm: paths[lm]}} if lm in paths else {}
        revision = lm_entry(self._alignment().get("lm_revisions", {}), paths, lm)
        if revision:
            section["lm_revisions"] = {lm: revision}
        return json.dumps({"scale": self.scale, **section}, sort_keys=True, separators=(",", ":"))

    def language_features_resources(self, lm: str) -> dict[str, int]:
        """The GPUs the ``language_features`` job for ``lm`` spreads it over (``device_map``):
        ``resources.lm_gpus`` (``lm_gpus``), with their node share, where the eval jobs have GPUs
        (Llama-3.1-70B in bf16, ~141 GB, needs 4 of 80 GB); on CPU (mini), none. The eval jobs'
        runtime: loading 70B weights from a shared file system alone can take most of an hour."""
        res = self.config.get("resources", {})
        out = {"gpu": 0, "runtime": self.eval_runtime()}
        if self.eval_gpus() > 0:
            out["gpu"] = lm_gpus(res.get("lm_gpus", {}), self._alignment().get("lm_paths", {}), lm)
            out.update(node_share(res, out["gpu"]))
        return out

    def eval_retries(self, remote: bool = False) -> int | None:
        """The ``vqa_probe`` / ``vqa`` / ``classic`` rules' ``retries``: ``resources.eval_retries``, else the
        profile's (a job stopped at its time limit resumes in its retry, ``evaluate.progress``),
        but 0 in the snakemake inside a cluster job, which would otherwise restart it in the
        same, ending allocation (``pretrain_retries``)."""
        if remote:
            return 0
        retries = self.config.get("resources", {}).get("eval_retries")
        return None if retries is None else int(retries)

    def control_args(self) -> str:
        """A control's input size and patch: those of the scale's 224 px encoders (finest patch)."""
        if not self.vqa_controls():
            return ""
        labels = self.config["labels"]
        patch = min(int(method_arch(size, method)["patch"]) for size in labels["sizes"].values()
                    for method in ("dino", "mae"))
        return f"--img-size {int(labels['resolutions']['224'])} --patch {patch}"

    def _eval_section(self, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """``evaluate.<kind>`` as (what the job computes, its settings); the ``vqa_probe`` job's
        is ``evaluate.vqa`` less what only the answering reads."""
        from webssl_repro.evaluate.vqa.config import probe_section

        vqa = kind in ("vqa", "vqa_probe")
        section = {k: v for k, v in self.config.get("evaluate", {}).get("vqa" if vqa else kind, {}).items()
                   if not (vqa and k == "controls")}  # which encoders run, not how: no rerun
        return split_settings(probe_section(section) if kind == "vqa_probe" else section, SETTINGS[kind])

    def eval_config_json(self, kind: str) -> str:
        """What an eval job computes (its rule's params): the section less its settings."""
        return json.dumps({"scale": self.scale, **self._eval_section(kind)[0]}, sort_keys=True, separators=(",", ":"))

    def settings_json(self, kind: str) -> str:
        """How a ``kind`` job runs (``SETTINGS``): passed by the shell, not a param. A pretraining
        run's are its own (``pretrain_settings_json``)."""
        if kind == "pretrain":
            raise ValueError("settings_json: a pretraining run's settings are its own: pretrain_settings_json(run)")
        if kind == "filter":
            how = split_settings({"filter": self.config.get("data", {}).get("filter", {})}, SETTINGS[kind])[1]
        else:
            how = self._eval_section(kind)[1]
        return json.dumps(how, sort_keys=True, separators=(",", ":"))

    def eval_gpus(self) -> int:
        return int(self.config.get("resources", {}).get("eval_gpus", 0))

    def eval_launcher(self, sized_for_refusal: int = 0) -> str:
        """How the ``vqa_probe`` / ``vqa`` rules start the CLI: torchrun over the eval GPUs when the probe is
        data-parallel (``evaluate.vqa.strategy`` ddp/fsdp2) and there is more than one; one
        process for an attempt sized to be refused (``eval_job_resources``), whose ledger check
        comes before any GPU work and which has one core and 2 GB for it, not 8 ranks' imports."""
        strategy = self.config.get("evaluate", {}).get("vqa", {}).get("strategy", "none")
        gpus = self.eval_gpus()
        if strategy == "none" or gpus <= 1 or sized_for_refusal:
            return "webssl-repro"
        return torchrun(f"--standalone --nnodes 1 --nproc-per-node {gpus} -m webssl_repro.cli")

    def eval_job_launcher(self, out: str, attempt: int, kind: str = "vqa") -> str:
        """``eval_launcher`` for attempt ``attempt`` of the ``kind`` (vqa or vqa_probe) job
        writing ``out`` (one process where the attempt is sized to be refused)."""
        return self.eval_launcher(sized_for_refusal=self.eval_job_resources(kind, out, attempt)["sized_for_refusal"])

    def eval_runtime(self) -> int:
        return int(self.config.get("resources", {}).get("eval_runtime_min", 60))

    def eval_resources(self, kind: str = "vqa") -> dict[str, int]:
        """Resources of an evaluation job. On GPUs it takes a node's share for its GPUs: the
        VQA probe's torchrun ranks each load the LM (Llama-3-8B: ~32 GB, fp32 weights) and
        the encoder before FSDP shards the LM; the classic probes and the alignment job (whose
        LM features are the ``language_features`` jobs') run the encoder on one. Without GPUs
        (mini), the defaults."""
        res = self.config.get("resources", {})
        gpus = min(self.eval_gpus(), 1) if kind in ("classic", "alignment") else self.eval_gpus()
        out = {"gpu": gpus, "runtime": self.eval_runtime()}
        if gpus > 0:  # one node's GPUs (torchrun --standalone)
            out.update(node_share(res, gpus))
        return out

    def eval_job_resources(self, kind: str, out: str, attempt: int) -> dict[str, Any]:
        """The resources of attempt ``attempt`` of the ``kind`` job writing ``out``: its own
        (``eval_resources``), or, where the attempts ledger in its state directory says the
        attempt will be refused (``evaluate.progress``), those same keys at ``REFUSED_ATTEMPT``'s
        values: a refused retry of the VQA probe is not submitted on a node's 8 GPUs."""
        from webssl_repro.evaluate.progress import SAVED, state_dir
        from webssl_repro.train.attempts import sized_for_attempt

        own = self.eval_resources(kind)
        return sized_for_attempt(self._job_resources, out, state_dir(out, kind), attempt, lambda: own,
                                 {key: REFUSED_ATTEMPT[key] for key in own}, measure=SAVED)

    def eval_threads(self, kind: str = "vqa") -> int:
        return self.eval_resources(kind).get("cpus_per_task", 1)
