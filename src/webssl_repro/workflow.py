"""What the DAG builds for a config: requested items, the run grid, every path.

The Snakefile and rules/*.smk are thin: they ask a ``Plan`` for targets, inputs and
resources, so that all of the DAG's logic is ordinary, testable Python.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from webssl_repro.config import ConfigError, load_config
from webssl_repro.files import repo_root
from webssl_repro.paper import specs
from webssl_repro.recipes import (SCHEDULE_DEFAULTS, STEP_DEFAULTS, STEP_KEYS, check_schedule, check_shapes,
                                  hires_recipe)
from webssl_repro.resources import dino_local_size, label, run_arch, samples_of
from webssl_repro.runs import Run, label_legend, sort_runs, split_seed, with_seed
from webssl_repro.settings import split_pretrain
from webssl_repro.workflow_data import DataJobs
from webssl_repro.workflow_evals import EvalJobs
from webssl_repro.workflow_paper import PaperJobs
from webssl_repro.workflow_pretrain import INVOCATION_VAR, PretrainJobs, _alternatives

TABLE_FORMATS = ("tsv", "md", "tex")
FIGURE_FORMATS = ("pdf", "png")
PUBLISHED_DIR = "results/published"
# Which stages an evaluation needs besides pretraining.
STAGE_OF_EVAL = {"vqa": "vqa", "classic": "classic", "alignment": "alignment", "filter": "data"}


@dataclass(frozen=True)
class Plan(DataJobs, EvalJobs, PaperJobs, PretrainJobs):
    config: Mapping[str, Any]

    def __post_init__(self) -> None:
        from webssl_repro.plan_checks import (check_activation_checkpointing, check_alignment, check_classic,
                                              check_clip_tokenizer, check_eval_gpus, check_filter, check_gpu_jobs,
                                              check_in1k_images, check_language_models, check_run_sources,
                                              check_sizes, check_tolerances, check_vqa)

        check_tolerances(self.config.get("check", {}).get("tolerances", {}))
        if not self.published:
            check_run_sources(self.run_sources, self.scale, self.seeds)
            check_sizes(self.config.get("labels", {}).get("sizes", {}))
            check_eval_gpus(self.config.get("resources", {}))
            check_gpu_jobs(self.config, self.stages)
            check_in1k_images(self.config)
            if "alignment" in self.stages:
                check_language_models(self.config.get("evaluate", {}).get("alignment", {}),
                                      self.config.get("resources", {}))
                check_alignment(self.config.get("evaluate", {}).get("alignment", {}),
                                self.config.get("data", {}).get("evalsets", {}))
            if "pretrain" in self.stages:
                check_clip_tokenizer(self.config.get("pretrain", {}))
                check_activation_checkpointing(self.config)
            if "data" in self.stages:
                check_filter(self.config.get("data", {}).get("filter", {}))
            if "vqa" in self.stages:
                check_vqa(self.config.get("evaluate", {}).get("vqa", {}))
            if "classic" in self.stages:
                check_classic(self.config.get("evaluate", {}).get("classic", {}),
                              self.config.get("labels", {}).get("sizes", {}))
            evalsets = self.config.get("data", {}).get("evalsets", {})
            if "classic" in self.stages and evalsets.get("source") == "hf":
                from webssl_repro.data.real_evalsets import check_hf_evalsets

                check_hf_evalsets(evalsets, ("segmentation", "depth"))

    @cached_property
    def _job_resources(self) -> dict[tuple, dict[str, Any]]:
        """Each job attempt's resources, decided once (``train.attempts.sized_for_attempt``)."""
        return {}

    # ---- scale -------------------------------------------------------------------------
    @property
    def scale(self) -> str:
        return self.config["scale"]

    @property
    def published(self) -> bool:
        return self.config["source"] == "published"

    @property
    def stages(self) -> frozenset[str]:
        return frozenset(self.config.get("stages", ()))

    @property
    def results(self) -> str:
        return f"results/{self.scale}"

    @property
    def paper_dir(self) -> str:
        return f"paper/{self.scale}"

    # ---- items -------------------------------------------------------------------------
    def item_buildable(self, item_id: str) -> bool:
        """An item is requested when every stage behind its numbers is built at this scale."""
        item = specs.get_item(item_id)
        if self.published:
            return True
        if not self.item_sources(item):
            return False  # only off-the-shelf baselines none of which is imported (Table 14): published rows
        needed = {"pretrain", *(STAGE_OF_EVAL[e] for e in item.evals)}
        return needed <= self.stages

    @cached_property
    def requested_items(self) -> tuple[str, ...]:
        """The config's items as written (less fig8, a data-stage figure: see ``data_figures``),
        an unknown one refused by name."""
        requested = tuple(i for i in self.config.get("items", ()) if i != "fig8")
        unknown = [i for i in requested if i not in specs.ITEMS]
        if unknown:
            raise ConfigError(f"items: unknown paper item(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted([*specs.ITEMS, 'fig8'], key=_item_order))}")
        return requested

    @cached_property
    def items(self) -> tuple[str, ...]:
        """The requested items this scale builds."""
        return tuple(i for i in self.requested_items if self.item_buildable(i))

    @cached_property
    def skipped_items(self) -> dict[str, str]:
        """Requested items this scale does not build, each with the reason (shown by ``all``)."""
        skipped = {}
        for item_id in self.config.get("items", ()):
            if item_id == "fig8":
                if "data" not in self.stages:
                    skipped[item_id] = "needs the data stage"
            elif not self.item_buildable(item_id):
                item = specs.get_item(item_id)
                missing = sorted({"pretrain", *(STAGE_OF_EVAL[e] for e in item.evals)} - self.stages)
                skipped[item_id] = (f"needs stages {', '.join(missing)}" if self.item_sources(item) and missing
                                    else "off-the-shelf models only, none imported (pretrain.run_sources): "
                                         "see the published scale")
        return skipped

    @cached_property
    def item_runs(self) -> tuple[str, ...]:
        """The runs behind the requested items: what ``all`` trains (or imports) and evaluates."""
        if self.published:
            return ()
        return tuple(sort_runs(r for i in self.items for r in self.item_sources(specs.get_item(i))))

    def item_sources(self, item: specs.Item) -> tuple[str, ...]:
        """The encoders whose evaluations an item reads at this scale: its runs, and the
        off-the-shelf baselines this config imports (``pretrain.run_sources``, e.g. DINOv2 ViT-g
        as ``dinov2-g-224``); its other baselines are the paper's printed numbers."""
        return (*item.runs, *(s for s in item.baselines if s in self.run_sources))

    @cached_property
    def grid_runs(self) -> tuple[str, ...]:
        """The runs of every requested item where the pretrain stage runs, whether or not its
        evaluation stages do: what ``snakemake runs`` trains (or imports)."""
        if self.published or "pretrain" not in self.stages:
            return ()
        return tuple(sort_runs(r for i in self.requested_items for r in specs.get_item(i).runs))

    @cached_property
    def runs(self) -> tuple[str, ...]:
        """Every run this config knows: the grid's and any other released run it imports
        (``pretrain.run_sources``), built when one of its outputs is asked for."""
        if self.published:
            return ()
        return tuple(sort_runs({*self.grid_runs, *self.item_runs, *self.run_sources}))

    def run_targets(self) -> list[str]:
        """``snakemake runs``: the encoder of each grid run and seed, and nothing evaluated."""
        return [f"{self.run_dir(r)}/encoder.safetensors" for run in self.grid_runs for r in self.seeded(run)]

    @property
    def seeds(self) -> list[int]:
        return [int(x) for x in self.config.get("seeds", [0])]

    @cached_property
    def run_ids(self) -> tuple[str, ...]:
        """Every (run, seed) as a directory name: ``dino1b-full2b-224``, ``dino1b-full2b-224.s1``."""
        return tuple(with_seed(r, s, self.seeds[0]) for s in self.seeds for r in self.runs)

    def seeded(self, run: str) -> list[str]:
        return [with_seed(run, s, self.seeds[0]) for s in self.seeds]

    @property
    def run_sources(self) -> dict[str, dict[str, Any]]:
        """Runs imported from a released checkpoint instead of trained (``pretrain.run_sources``)."""
        return dict(self.config.get("pretrain", {}).get("run_sources", {}))

    def language_models(self) -> list[str]:
        return list(self.config.get("evaluate", {}).get("alignment", {}).get("language_models", ["minilm"]))

    def label_legend(self) -> str:
        """What the paper's labels stand for at this scale, printed under every rendered item
        (none at the published scale, where they are the paper's own)."""
        return "" if self.published else label_legend(self.config.get("labels", {}), self.scale)

    def render_language_models(self, item_id: str) -> list[str]:
        """The language models a figure draws (Fig. 9's alignment bars), as its render rule's
        param: changing them rebuilds that figure alone."""
        return self.language_models() if specs.get_item(item_id).kind == "bars" else []

    # ---- paths -------------------------------------------------------------------------
    def item_outputs(self, item_id: str) -> list[str]:
        item = specs.get_item(item_id)
        if item.kind == "table":
            return [f"{self.paper_dir}/tables/{item_id}.{ext}" for ext in TABLE_FORMATS]
        return [f"{self.paper_dir}/figures/{item_id}.{ext}" for ext in FIGURE_FORMATS]

    def run_dir(self, run: str) -> str:
        return f"{self.results}/runs/{run}"

    def evaluated_encoder(self, run_id: str) -> str:
        """The encoder an evaluation of ``run_id`` reads: a run of this config (a seed it lists,
        a run of its items or of ``pretrain.run_sources``), else an error that says so, where
        Snakemake would only report the encoder as a missing input."""
        if run_id not in self.run_ids:
            raise ConfigError(f"{self.results}/evals/{run_id}: {self.not_a_run(run_id)}")
        return f"{self.run_dir(run_id)}/encoder.safetensors"

    def not_a_run(self, run_id: str) -> str:
        """Why ``run_id`` is not a run of this config: a seed it does not list, or a run name it has not."""
        name, seed = split_seed(run_id, self.seeds[0])
        if name in self.runs:
            return f"seed {seed} is not in seeds {self.seeds}"
        return (f"{name} is not a run of this config's items nor of pretrain.run_sources; the runs are "
                f"{', '.join(self.runs)}")

    def unknown_run(self, path: str) -> None:
        """Raise for a target under ``runs/`` of a run this config has not, listing the runs,
        where Snakemake would only say that no rule produces it."""
        raise ConfigError(f"{path}: {self.not_a_run(path.split('/')[3])}")

    def unknown_run_pattern(self) -> str:
        """A wildcard constraint matching any run name but this config's (before its ``/``)."""
        return _any_dir_but(self.run_ids)

    def other_scale_pattern(self, *also: str) -> str:
        """A wildcard constraint matching any scale name but this config's and ``also`` (before its ``/``)."""
        return _any_dir_but((self.scale, *also))

    def other_scale(self, path: str) -> None:
        """Raise for a target under another scale's tree (``results/<scale>/…``,
        ``paper/<scale>/…``), naming the config that builds it."""
        scale = path.split("/")[1]
        config = Path("config") / f"{scale}.yaml"
        how = (f"add `--configfile {config}` (and any overlay) after the targets" if config.exists() else
               f"there is no {config}: a config whose `scale` is {scale} builds it")
        raise ConfigError(f"{path} belongs to scale {scale}, and this config is scale {self.scale}: {how}")

    def eval_path(self, run: str, kind: str) -> str:
        return f"{self.results}/evals/{run}/{kind}.json"

    def checkpoint_dir(self, run: str) -> str:
        """Resumable checkpoints live beside, not inside, the run's declared outputs, so a
        failed or preempted job keeps them for its retry."""
        return f"{self.results}/checkpoints/{run}"

    def pretrain_data(self, run: Run) -> list[str]:
        """The manifest a run trains on: ImageNet-1k's, the corpus', or a filter result, which
        lists the shards of its kept samples."""
        if run.data == "in1k":
            return [self.data_manifest("in1k")]
        if run.data in ("light", "heavy"):
            return [self.filter_stats(run.data)]
        return [self.data_manifest("shards")]

    def pretrain_inputs(self, run_id: str) -> dict[str, Any]:
        name, seed = split_seed(run_id, self.seeds[0])
        run = Run.parse(name)
        inputs: dict[str, Any] = {"data": self.pretrain_data(run)}
        if run.parent is not None:  # hi-res fine-tune starts from the same seed's 224 px run (paper App. C)
            if str(run.parent) in self.run_sources:
                raise ConfigError(f"pretrain.run_sources.{run.parent}: {name} fine-tunes it from its training "
                                  "state (teacher, heads, optimizer), which an imported encoder does not have; "
                                  f"train {run.parent} or import {name} itself")
            inputs["parent"] = f"{self.run_dir(with_seed(str(run.parent), seed, self.seeds[0]))}/state.pt"
        return inputs

    def recipe(self, r: Run) -> tuple[dict[str, Any], dict[str, str]]:
        """``r``'s method recipe with the config's layers applied (ImageNet-1k, hi-res fine-tune),
        and the config key each value came from."""
        labels = self.config["labels"]
        pretrain = self.config.get("pretrain", {})
        recipe = dict(pretrain.get(r.method, {}))
        origin = {k: f"pretrain.{r.method}.{k}" for k in recipe}  # where each value came from, for errors
        if r.data == "in1k":
            over = pretrain.get("in1k", {}).get(r.method, {})
            recipe.update(over)
            origin.update({k: f"pretrain.in1k.{r.method}.{k}" for k in over})
        if r.parent is not None:
            hires = pretrain.get("hires", {})
            if "steps" not in hires:
                raise ConfigError(f"pretrain.hires.steps: {r} is a high-resolution fine-tune; set its steps")
            over = hires.get(r.method, {})
            recipe = hires_recipe(recipe, int(hires["steps"]), over, samples_of(r.parent, self.config),
                                  STEP_DEFAULTS.get(r.method), SCHEDULE_DEFAULTS[r.method]["batch_size"])
            origin.update({k: f"{origin.get(k, f'pretrain.{r.method}.{k} (unset: the default)')}, scaled to "
                              "pretrain.hires.steps" for k in STEP_KEYS if k in recipe})
            origin.update({k: f"pretrain.hires.{r.method}.{k}" for k in over})
        if r.method == "dino":  # DINOv2's blur pixels belong to the base ("224") crop at every resolution
            recipe.setdefault("blur_reference_size", int(labels["resolutions"].get("224", 224)))
            if r.parent is not None:  # a 224 px run sizes them by its own crop (train.run)
                recipe.setdefault("local_crop_size", dino_local_size(r, self.config))
        return recipe, origin

    def run_config(self, run: str) -> dict[str, Any]:
        """The slice of the config one run depends on: changing anything else does not retrain it.
        ImageNet-1k runs lay ``pretrain.in1k.{method}`` over the method's recipe (their
        schedule sized to their own, shorter run). A warm-up that does not end before the run
        does is a ``ConfigError`` (``check_schedule``)."""
        name, seed = split_seed(run, self.seeds[0])
        r = Run.parse(name)
        pretrain = self.config.get("pretrain", {})
        recipe, origin = self.recipe(r)
        config = {
            "run": run,
            "scale": self.scale,
            "arch": run_arch(self.config, r),
            "img_size": int(label(self.config, "resolutions", str(r.res), run)),
            "samples_seen": samples_of(r, self.config),
            "recipe": recipe,
            "train": self._train_section(r),
            "seed": seed,
        }
        if pretrain.get("loader"):  # only when set: an unset loader leaves every run's params as they were
            config["loader"] = dict(pretrain["loader"])
        check_schedule(config, r.method, origin)
        check_shapes(config, r.method, self.pretrain_resources(run).gpus if self.trained(run) else 1, origin)
        return config

    def run_config_json(self, run: str) -> str:
        """What the run's weights depend on (its rules' params): ``run_config`` less the
        settings of ``pretrain_settings_json``."""
        what = split_pretrain(self.run_config(run))[0]
        return json.dumps(what, sort_keys=True, separators=(",", ":"))

    def item_inputs(self, item_id: str) -> list[str]:
        """The files an item's numbers come from — nothing else, so one figure rebuilds alone.
        An item this config does not build is refused (``not_built``), also when asked for by path."""
        item = specs.get_item(item_id)
        if item_id not in self.items:
            self.not_built(item_id)
        if self.published:
            return published_files(item)
        inputs: list[str] = []
        for run in self.item_sources(item):
            for kind in item.evals:
                if kind == "filter":
                    data = Run.parse(run).data
                    if data in ("light", "heavy"):
                        inputs.append(self.filter_stats(data))
                else:
                    inputs.extend(self.eval_path(r, kind) for r in self.seeded(run))
        if any(s not in self.run_sources for s in item.baselines):
            inputs.extend(published_files(item))
        inputs.extend(self.no_image_inputs(item.metrics))
        return list(dict.fromkeys(inputs))

    def all_targets(self) -> list[str]:
        return [p for i in self.items for p in self.item_outputs(i)] + self.data_figures()

    def not_built(self, item: str) -> None:
        """Raise why ``snakemake {item}`` has nothing to build at this scale (the target rule
        of an item this config does not build)."""
        why = self.skipped_items.get(item, "not in this config's items")
        if item == "fig8":  # samples of this scale's own filtered corpus: the paper's are not transcribed
            raise ConfigError(f"fig8 is not built at scale {self.scale}: {why}. It shows samples of a scale's own "
                              "light / heavy corpus: snakemake fig8 (mini) draws one")
        raise ConfigError(f"{item} is not built at scale {self.scale}: {why}. Its published render: "
                          f"snakemake {item} --configfile config/published.yaml")



def _any_dir_but(names) -> str:
    """A path segment other than ``names`` (a lookahead anchored on the ``/`` after it)."""
    return rf"(?!(?:{_alternatives(list(names))})/)[^/]+"


def _item_order(item_id: str) -> tuple[bool, int]:
    """Tables before figures, each by number."""
    return item_id.startswith("fig"), int(item_id.lstrip("tablefig"))


def published_files(item: specs.Item) -> list[str]:
    """The TSVs under results/published that hold an item's source tables."""
    from webssl_repro.paper.published import files_of_tables

    return [f"{PUBLISHED_DIR}/{file}" for file in files_of_tables(item.published)]


def mark_invocation(remote: bool, environ: Any = None) -> str | None:
    """Give this snakemake invocation a fresh id that its jobs inherit, local or submitted
    (``train.attempts`` tells this invocation's attempts from an earlier one's by it). The
    snakemake inside a cluster job (``remote``) keeps the submitter's. Returns the id."""
    import uuid

    environ = os.environ if environ is None else environ
    if not remote:
        environ[INVOCATION_VAR] = uuid.uuid4().hex
    return environ.get(INVOCATION_VAR)


def put_cli_on_path(environ: Any = None, executable: str | None = None) -> str:
    """Prepend the bin directory of the interpreter running Snakemake to ``PATH`` (once).

    Rules call the package's ``webssl-repro`` command. Run as ``.venv/bin/snakemake`` (what
    ``make reproduce`` does) without an activated venv, that command is not on ``PATH``; jobs,
    local or submitted to SLURM, inherit the environment this sets. Returns the new ``PATH``.
    """
    environ = os.environ if environ is None else environ
    bin_dir = str(Path(executable or sys.executable).parent)
    parts = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    if bin_dir not in parts:
        environ["PATH"] = os.pathsep.join([bin_dir, *parts])
    return environ["PATH"]


def shipped_plan(scale: str = "mini") -> Plan:
    """The plan of a config this repository ships (``config/{scale}.yaml``), validated: what
    benchmarks and diagnostics size themselves by."""
    return Plan(load_config(repo_root() / "config" / f"{scale}.yaml"))
