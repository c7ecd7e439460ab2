"""The data-stage jobs of the DAG: the corpus, the text filter (whole or in parts) and the
eval sets a scale builds, and Figure 8 that samples them. A part of ``workflow.Plan`` (its
base class), kept apart by concept; it reads the Plan's config, paths and stages.
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Mapping

from webssl_repro.resources import node_share
from webssl_repro.settings import SETTINGS, split_settings

#: The eval sets the data stage builds (``webssl-repro data evalset``; the defaults of each in
#: ``data.stages.EVAL_DEFAULTS``), and those the classic evaluation reads.
EVAL_SETS = ("classification", "segmentation", "depth", "captions", "vqa")
CLASSIC_SETS = EVAL_SETS[:3]


class DataJobs:
    """Data-stage methods of ``workflow.Plan``."""

    config: Mapping[str, Any]
    results: str

    def filter_stats(self, data: str) -> str:
        return f"{self.results}/data/filter/{data}.json"

    def data_manifest(self, name: str) -> str:
        return f"{self.results}/data/{name}/manifest.json"

    def evalset(self, task: str) -> str:
        return f"{self.results}/data/evalsets/{task}.json"

    def lists_only(self, job: str) -> bool:
        """Whether a data job (``shards``, ``in1k``, ``evalset``, ``text_filter``) only lists or
        merges what exists: the user's shards, the hub's eval sets, a filter's parts. Snakemake
        then runs it itself (``localrule``), where a cluster would queue seconds of work for a
        node of the partition the pretraining runs in."""
        data = self.config.get("data", {})
        if job == "shards":
            return "shards" in data
        if job == "in1k":
            return "shards" in data.get("in1k", {})
        if job == "evalset":
            return data.get("evalsets", {}).get("source") == "hf"
        if job == "text_filter":
            return self.filter_parts() > 1
        raise KeyError(f"lists_only: no data job {job!r}")

    def data_config_json(self, part: str, task: str | None = None) -> str:
        """Only the part of ``data`` a rule reads, so changing one part reruns only its jobs."""
        data = self.config.get("data", {})
        if part == "evalsets":
            section = data.get("evalsets", {})
            picked = {k: v for k, v in section.items() if k in ("size", "base", "source") or k == task}
            return json.dumps({"evalsets": picked}, sort_keys=True, separators=(",", ":"))
        keys = ("corpus", "shards") if part == "corpus" else (part,)
        picked = {k: data[k] for k in keys if k in data}
        if part == "filter":  # how the filter runs is not what it keeps (settings.SETTINGS)
            picked = split_settings(picked, SETTINGS["filter"])[0]
        return json.dumps(picked, sort_keys=True, separators=(",", ":"))

    def filter_prerequisites(self, variant: str, part: int | None = None) -> list[str]:
        """The OCR backend reads each image once for both variants: heavy (or its part) waits
        for light's, whose reads it finds cached beside it."""
        backend = self.config.get("data", {}).get("filter", {}).get("backend", "ocr")
        if variant != "heavy" or backend != "ocr":
            return []
        return [self.filter_stats("light") if part is None else self.filter_part("light", part)]

    def filter_parts(self) -> int:
        return int(self.config.get("data", {}).get("filter", {}).get("parts", 1))

    def filter_part(self, variant: str, part: int | str) -> str:
        return f"{self.results}/data/filter/parts/{variant}.{part}.json"

    def filter_inputs(self, variant: str) -> dict[str, Any]:
        """One job over the corpus, or (``data.filter.parts`` > 1) the parts to merge."""
        if self.filter_parts() == 1:
            return {"shards": self.data_manifest("shards"), "after": self.filter_prerequisites(variant)}
        return {"parts": [self.filter_part(variant, k) for k in range(self.filter_parts())]}

    def filter_command(self, variant: str, part: int | None = None) -> str:
        """The command before ``--out`` of ``text_filter`` (``part`` None: the whole corpus, or
        the merge of its parts) and of ``text_filter_part``."""
        if part is None and self.filter_parts() > 1:  # a pattern: thousands of paths could pass ARG_MAX
            return (f"webssl-repro data filter-merge --part-pattern {self.filter_part(variant, '{part}')} "
                    f"--count {self.filter_parts()}")
        return (f"webssl-repro data filter {variant} --data-json {shlex.quote(self.data_config_json('filter'))} "
                f"--shards {self.data_manifest('shards')}" + ("" if part is None else f" --part {part}"))

    def filter_settings(self, whole: bool = False) -> str:
        """How a filter job runs (``data.filter.workers`` / ``threads`` / ``cache_path``) as its
        command's ``--settings-json``: a resource of the filter rules, not a param, so that
        changing it reruns no filter and retrains no filtered run. Merging parts takes none."""
        how = self.settings_json("filter")
        if how == "{}" or (whole and self.filter_parts() > 1):
            return ""
        return f"--settings-json {shlex.quote(how)}"

    def filter_resources(self, whole: bool = False) -> dict[str, int]:
        """A filter job's GPUs and runtime (``resources.filter_*``), on GPUs its node's share
        (the MLLM's weights pass through host memory), and a CPU per loader worker
        (``data.filter.workers``) beside its own; merging parts needs none of them."""
        if whole and self.filter_parts() > 1:
            return {}
        res = self.config.get("resources", {})
        workers = int(self.config.get("data", {}).get("filter", {}).get("workers", 0))
        gpus = int(res.get("filter_gpus", 0))
        out = {"gpu": gpus, "runtime": int(res.get("filter_runtime_min", 60))}
        if gpus > 0:
            out.update(node_share(res, gpus))
        if workers:
            out["cpus_per_task"] = max(out.get("cpus_per_task", 1), workers + 1)
        return out

    def data_targets(self) -> list[str]:
        if "data" not in self.stages:
            return []
        tasks = [t for t in EVAL_SETS if t != "vqa" or self.vqa_data()]
        return [self.data_manifest("shards"), self.data_manifest("in1k"),
                self.filter_stats("light"), self.filter_stats("heavy"), *(self.evalset(t) for t in tasks)]

    def data_figures(self) -> list[str]:
        """Figure 8 (filtered samples) comes from the data stage, not from eval results."""
        if "data" not in self.stages or "fig8" not in self.config.get("items", ()):
            return []
        return [f"{self.paper_dir}/figures/fig8.pdf", f"{self.paper_dir}/figures/fig8.png"]

    def fig8_inputs(self) -> dict[str, str]:
        """The corpus and the two filter results Figure 8 samples; only where the data stage
        is built (the published scale has no corpus to generate)."""
        if not self.data_figures():
            self.not_built("fig8")
        return {"shards": self.data_manifest("shards"), "light": self.filter_stats("light"),
                "heavy": self.filter_stats("heavy")}
