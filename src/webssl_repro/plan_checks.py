"""Config checks that need the run grid: they stop the dry run, naming the key, instead of a
job hours later (or never, for a key that would silently do nothing)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from webssl_repro.config import ConfigError
from webssl_repro.files import lm_entries
from webssl_repro.metrics import ALIGNMENT_PREFIX
from webssl_repro.paper import specs


def check_tolerances(tolerances: Mapping[str, Any]) -> None:
    """``check.tolerances`` keys are metrics some item prints (a misspelt one would leave its
    metric without a tolerance)."""
    known = {m for item in specs.ITEMS.values() for m in item.metrics}
    unknown = sorted(k for k in tolerances if k not in known and not k.startswith(ALIGNMENT_PREFIX))
    if unknown:
        raise ConfigError(f"check.tolerances: unknown metric(s) {unknown}; known metrics are {sorted(known)} "
                          f"and {ALIGNMENT_PREFIX}<language model>")


def check_sizes(sizes: Mapping[str, Mapping[str, Any]]) -> None:
    """Each ``labels.sizes`` entry builds a ViT (``models.arch.Arch``: width divisible by heads),
    and so does its Web-MAE variant (``resources.method_arch``), checked at the dry run rather than by
    a pretraining job after it queued for its nodes."""
    from webssl_repro.models.arch import Arch
    from webssl_repro.resources import method_arch

    for label, spec in sizes.items():
        for method in ("dino", "mae"):
            try:
                Arch.from_config(method_arch(spec, method))
            except (KeyError, ValueError) as err:
                where = f"{label}.mae" if method == "mae" and "mae" in spec else label
                raise ConfigError(f"labels.sizes.{where}: {err.args[0] if err.args else err}") from None


def check_eval_gpus(resources: Mapping[str, Any]) -> None:
    """An evaluation job runs on one node (``torchrun --standalone``, the 70B LM's device map):
    ``resources.eval_gpus`` or ``lm_gpus`` beyond ``gpus_per_node`` would be a job SLURM can
    never start."""
    per_node = int(resources.get("gpus_per_node", 0))
    wanted = {"eval_gpus": int(resources.get("eval_gpus", 0))}
    if wanted["eval_gpus"]:  # without eval GPUs, language_features jobs run on CPU
        wanted.update({f"lm_gpus.{lm}": int(n) for lm, n in resources.get("lm_gpus", {}).items()})
    for key, gpus in wanted.items():
        if gpus > per_node:
            raise ConfigError(f"resources.{key}: {gpus} GPUs, but an evaluation job runs on one node and "
                              f"resources.gpus_per_node is {per_node}")


def check_in1k_images(config: Mapping[str, Any]) -> None:
    """``labels.in1k_images`` (an ImageNet-1k epoch, the in1k runs' samples seen) is the generated
    stand-in's size where ``data.in1k`` is generated: another number would size every in1k run by
    a corpus it does not train on (ImageNet's 1,281,167 on a 1,024-image mini corpus)."""
    from webssl_repro.resources import in1k_images

    in1k = config.get("data", {}).get("in1k", {})
    stated = config.get("labels", {}).get("in1k_images")
    if stated is None or "shards" in in1k:
        return
    generated = in1k_images({"data": config.get("data", {})})
    if int(stated) != generated:
        raise ConfigError(f"labels.in1k_images is {stated}, but data.in1k generates {generated} images "
                          "(data.in1k.n_images): an ImageNet-1k epoch is the corpus the in1k runs train on")


def check_gpu_jobs(config: Mapping[str, Any], stages: Sequence[str]) -> None:
    """On GPU nodes, jobs that load a real language model or the MLLM filter on CUDA need GPUs of
    their own (``resources.eval_gpus``, ``filter_gpus``, 0 by default): planned without, they
    would be submitted as CPU jobs and fail, or crawl, only once they start."""
    res = config.get("resources", {})
    if not int(res.get("gpus_per_node", 0)):
        return
    from webssl_repro.evaluate.vqa.config import VqaConfig

    evaluate = config.get("evaluate", {})
    needs = []
    lm = evaluate.get("vqa", {}).get("language_model", VqaConfig.language_model)  # unset: the job's default
    if "vqa" in stages and lm != "tiny":
        needs.append(("eval_gpus", f"evaluate.vqa.language_model {lm!r}"))
    lms = [m for m in evaluate.get("alignment", {}).get("language_models", ["minilm"]) if m != "minilm"]
    if "alignment" in stages and lms:
        needs.append(("eval_gpus", f"evaluate.alignment.language_models {lms}"))
    filt = config.get("data", {}).get("filter", {})
    if "data" in stages and filt.get("backend") == "mllm" and str(filt.get("device", "cpu")).startswith("cuda"):
        needs.append(("filter_gpus", f"data.filter (backend mllm on {filt['device']})"))
    for key, why in needs:
        if not int(res.get(key, 0)):
            raise ConfigError(f"resources.{key} is {res.get(key, 0)} (unset: 0), but {why} runs on GPUs: set "
                              f"resources.{key} to the GPUs one such job uses, as config/paper.yaml does")


def check_language_models(alignment: Mapping[str, Any], resources: Mapping[str, Any]) -> None:
    """Each ``evaluate.alignment.language_models`` name is MiniLM, a key of ``lm_paths``, or a
    hub id / path itself: a misspelt name would otherwise be sent to the hub as a repo id by its
    language_features job. A ``resources.lm_gpus`` or ``lm_revisions`` key names one of them or
    of ``lm_paths``: misspelt, the 70B model would be given the default one GPU, and fail there,
    or its features read at the newest revision; a pin beside a local copy is refused."""
    paths = alignment.get("lm_paths", {})
    names = alignment.get("language_models", ["minilm"])
    for name in names:
        if name != "minilm" and name not in paths and "/" not in name:
            raise ConfigError(f"evaluate.alignment.language_models: {name!r} is not 'minilm', nor a key of "
                              f"evaluate.alignment.lm_paths ({', '.join(paths) or 'none'}), nor a hub id "
                              "('org/name') or path")
    for key, entries in (("resources.lm_gpus", resources.get("lm_gpus", {})),
                         ("evaluate.alignment.lm_revisions", alignment.get("lm_revisions", {}))):
        for name in entries:
            if name not in names and name not in paths:
                raise ConfigError(f"{key}: {name!r} is not one of evaluate.alignment.language_models "
                                  f"({', '.join(names)}) nor of its lm_paths ({', '.join(paths) or 'none'})")
        for name in names:  # a hub id and the lm_paths keys naming it are one model: one setting
            given = lm_entries(entries, paths, name)
            if len({repr(v) for v in given.values()}) > 1:
                raise ConfigError(f"{key}: {', '.join(f'{k!r}: {v!r}' for k, v in given.items())} are one language "
                                  f"model ({name}) set differently: keep one of them")
    from webssl_repro.evaluate.alignment_eval import lm_revision

    with _as_config_error():  # a pin beside a local copy, which from_pretrained would ignore
        for name in names:
            lm_revision(name, alignment)


@contextlib.contextmanager
def _as_config_error() -> Iterator[None]:
    """A section's own reader (the job's), run at the dry run: what it refuses stops the plan."""
    try:
        yield
    except (KeyError, ValueError) as err:
        raise ConfigError(err.args[0] if err.args else str(err)) from None


def check_alignment(alignment: Mapping[str, Any], evalsets: Mapping[str, Any]) -> None:
    """Mutual k-NN over N captions needs 1 <= k < N: checked here, not by each alignment job
    after its encoder's and the language models' features are computed. N is the generated
    set's ``captions.test``, or WIT-1024's size (a real set's ``limit`` where set)."""
    from webssl_repro.data.stages import EVAL_DEFAULTS

    captions = evalsets.get("captions") or {}
    if evalsets.get("source") == "hf":
        n = int(captions.get("limit") or EVAL_DEFAULTS["captions"]["test"])
    else:
        n = int(captions.get("test", EVAL_DEFAULTS["captions"]["test"]))
    k = alignment.get("k", 10)
    if not isinstance(k, int) or not 1 <= k < n:
        raise ConfigError(f"evaluate.alignment.k: {k!r} nearest neighbours among the {n} captions of "
                          f"data.evalsets.captions; it must be in [1, {n - 1}]")


def check_vqa(section: Mapping[str, Any]) -> None:
    """``evaluate.vqa`` as the VQA job reads it (``VqaConfig.from_mapping``: chat format,
    projector, token count, precision), and where a real LM's data comes from: a hub LM with no
    ``data`` section would read the paper's Cambrian and benchmark defaults from the hub."""
    from webssl_repro.evaluate.progress import split_settings as progress_settings
    from webssl_repro.evaluate.vqa.config import VqaConfig
    from webssl_repro.evaluate.vqa.stage import STAGE_KEYS

    with _as_config_error():  # the job reads its progress settings apart (evaluate.progress)
        VqaConfig.from_mapping({k: v for k, v in progress_settings(section, "vqa")[0].items() if k not in STAGE_KEYS})
    if section.get("language_model", "tiny") != "tiny" and not section.get("data"):
        raise ConfigError(f"evaluate.vqa.language_model is {section['language_model']!r}, a real LM, which reads "
                          "Cambrian and the 16 benchmarks from evaluate.vqa.data; this config has none (see "
                          "config/paper.yaml), so every VQA job would fetch the paper's defaults from the hub")


def check_filter(section: Mapping[str, Any]) -> None:
    """``data.filter``'s options are its backend's (``filters.backend_options``): an option of the
    other backend, left by an overlay that switched backends, would fail every filter job; so
    would a ``revision`` pinned beside a local ``model``, which the MLLM filter's constructor
    refuses (it loads nothing: the OCR engine's would load its models, and takes no path)."""
    from webssl_repro.data.filters import backend_class, backend_options

    backend = str(section.get("backend", "ocr"))
    with _as_config_error():
        options = backend_options(backend, section)
        if backend == "mllm":
            backend_class(backend)(**options)


def check_activation_checkpointing(config: Mapping[str, Any]) -> None:
    """Each run-name pattern of ``pretrain.train.activation_checkpointing`` matches some run name
    (``runs``' grammar): a misspelt one ('clip-*') would leave its runs to run out of memory."""
    import fnmatch

    from webssl_repro.resources import checkpointing_setting
    from webssl_repro.runs import DATA, METHODS, RESOLUTIONS, SAMPLES, SIZES

    setting = checkpointing_setting(config)
    if isinstance(setting, bool):
        return
    data = [f"{d}{n}" for d in DATA if d != "in1k" for n in SAMPLES] + ["in1k"]
    names = [f"{m}{size}-{d}-{res}" for m in METHODS for size in SIZES for d in data for res in RESOLUTIONS]
    unmatched = [p for p in setting if not fnmatch.filter(names, p)]
    if unmatched:
        raise ConfigError(f"pretrain.train.activation_checkpointing: pattern(s) {unmatched} match no run name "
                          "({method}{size}-{data}{samples}-{res}, e.g. dino1b-full2b-224; seeds are not part of it)")


def check_clip_tokenizer(pretrain: Mapping[str, Any]) -> None:
    """``tokenizer_revision`` pins a hub repo's commit: beside a tokenizer file or directory,
    which ``models.text.load_tokenizer`` refuses or reads unpinned, or no tokenizer (one learned
    from the captions), every CLIP run would fail, or silently ignore the pin, after its queue
    wait. Checked as each CLIP run reads it (``Plan.recipe``): ``pretrain.clip`` with the
    ImageNet-1k and hi-res overlays (``pretrain.in1k.clip``, ``pretrain.hires.clip``) laid on it,
    one or both, whether or not the grid has such a CLIP run yet."""
    keys = ("tokenizer", "tokenizer_revision")
    base = pretrain.get("clip") or {}
    for layers in ((), ("in1k",), ("hires",), ("in1k", "hires")):  # a hi-res run of in1k data takes both
        overs = [(layer, (pretrain.get(layer) or {}).get("clip") or {}) for layer in layers]
        if layers and not any(set(keys) & over.keys() for _, over in overs):
            continue
        merged, where = {k: base.get(k) for k in keys}, {k: f"pretrain.clip.{k}" for k in keys}
        for layer, over in overs:
            merged.update({k: over[k] for k in keys if k in over})
            where.update({k: f"pretrain.{layer}.clip.{k}" for k in keys if k in over})
        revision, tokenizer = merged["tokenizer_revision"], merged["tokenizer"]
        if revision is None:
            continue
        if not tokenizer:
            shown = "null" if tokenizer is None else repr(tokenizer)
            raise ConfigError(f"{where['tokenizer_revision']} {revision!r} pins a hub repo's commit, but "
                              f"{where['tokenizer']} is {shown} (a tokenizer learned from the captions): "
                              "set both or neither")
        local = Path(str(tokenizer))
        if local.exists():
            kind = "directory" if local.is_dir() else "file"
            raise ConfigError(f"{where['tokenizer_revision']} {revision!r} is a commit of a hub repo, but "
                              f"{where['tokenizer']} {str(tokenizer)!r} is a local {kind}: drop the revision")


def check_classic(section: Mapping[str, Any], sizes: Mapping[str, Mapping[str, Any]]) -> None:
    """``evaluate.classic`` as the classic job reads it, checked before the job has trained
    its first probes: known keys, a depth batch of whole SigLoss groups (``samples_per_gpu``),
    and encoders of at least the 4 blocks NYUd's lin.4 head reads."""
    from webssl_repro.evaluate.classic import classic_config
    from webssl_repro.evaluate.progress import split_settings as progress_settings

    with _as_config_error():  # the job reads its progress settings apart (evaluate.progress)
        dep = classic_config({k: v for k, v in progress_settings(section, "classic")[0].items() if k != "scale"})["depth"]
    if int(dep["batch_size"]) % int(dep["samples_per_gpu"]):
        raise ConfigError(f"evaluate.classic.depth.batch_size {dep['batch_size']} is not a multiple of "
                          f"samples_per_gpu {dep['samples_per_gpu']} (each SigLoss takes samples_per_gpu images)")
    shallow = {label: spec.get("depth") for label, spec in sizes.items() if int(spec.get("depth", 4)) < 4}
    if shallow:
        raise ConfigError(f"labels.sizes: {', '.join(f'{k}.depth {v}' for k, v in shallow.items())}: NYUd's lin.4 "
                          "head reads 4 blocks, so with the classic stage every size needs depth >= 4")


def check_run_sources(run_sources: Mapping[str, Mapping[str, Any]], scale: str, seeds: Sequence[int]) -> None:
    """``pretrain.run_sources``: each key a released run or an off-the-shelf encoder the paper
    compares against (in the grid or not: a run outside it is imported for the evaluations asked
    of it), imported from that very checkpoint, downloaded only at the paper scale (the mini
    scale never downloads), and with one seed: a release is one encoder, not a spread over seeds."""
    from webssl_repro.releases import checkpoint_of, directory_only, importable_runs, names_checkpoint, on_the_hub

    if run_sources and len(seeds) > 1:
        raise ConfigError(f"pretrain.run_sources with seeds {list(seeds)}: each seed would import the same "
                          "released encoder, so the mean and spread would be over one model; use one seed")
    for run, source in run_sources.items():
        where = f"pretrain.run_sources.{run}"
        expected = checkpoint_of(run)
        if expected is None:
            raise ConfigError(f"{where}: no released checkpoint is this run; the importable runs are "
                              f"{importable_runs()}")
        checkpoint = str(source.get("checkpoint", ""))
        if not names_checkpoint(checkpoint, expected):
            raise ConfigError(f"{where}.checkpoint: {checkpoint!r} is not the checkpoint of {run} ({expected})")
        if source.get("path") and directory_only(run) and Path(source["path"]).is_file():
            raise ConfigError(f"{where}.path: {source['path']} is a file, but {run} imports from a transformers "
                              f"model directory only (a local copy of {expected})")
        if not source.get("path") and not on_the_hub(run):
            raise ConfigError(f"{where}: no 'path', and {expected} is on no hub to download it from; give a "
                              "local copy of that file")
        if not source.get("path") and scale != "paper":
            raise ConfigError(f"{where}: no 'path', so the checkpoint would be downloaded, which only the "
                              f"paper scale does (this is {scale!r}); give a local HF directory or .pth")


def check_deployment(methods: Iterable[Any]) -> None:
    """``--sdm conda`` cannot build the rules' environment: ``environment.yml`` installs this
    checkout (``pip install -e .``), and Snakemake builds it from its copy of the file under
    ``.snakemake/conda/``, where ``.`` is not the checkout; the jobs would fail after the build.
    ``methods``: Snakemake's ``deployment_settings.deployment_method``."""
    if any(str(m).lower() == "conda" for m in methods or ()):
        raise ConfigError("--software-deployment-method conda (--sdm conda) cannot build this workflow's "
                          "environment: environment.yml installs this checkout (pip install -e .), which "
                          "Snakemake's copy under .snakemake/conda/ does not find. Create and activate it "
                          "yourself (conda env create -f environment.yml) and run without --sdm conda "
                          "(README: On a SLURM cluster)")


def check_profile_environment(default_resources: Iterable[str], environ: Mapping[str, str] | None = None) -> None:
    """A profile's ``default-resources`` that read the environment (``slurm_account:
    "$SLURM_ACCOUNT"``) need it set: unset, the literal ``$SLURM_ACCOUNT`` reaches sbatch, and
    only the first submission fails, after the dry run looked fine. Set but empty is a choice:
    the resource is empty, so the SLURM plugin guesses the account (or submits without one) and
    sbatch takes the cluster's default partition."""
    import os
    import re

    environ = os.environ if environ is None else environ
    unset = []
    for arg in default_resources or ():
        name, _, value = str(arg).partition("=")
        m = re.fullmatch(r"""['"]?\$\{?(\w+)\}?['"]?""", value.strip())
        if m and environ.get(m.group(1)) is None:
            unset.append(f"{name} reads ${m.group(1)}")
    if unset:
        raise ConfigError(f"the profile's default-resources read unset environment variables: {'; '.join(unset)}. "
                          "Export them; export one empty (e.g. SLURM_ACCOUNT=) where your site has none "
                          "(README: On a SLURM cluster)")
