"""Cluster resources of a run as functions of its labels and the config.

Training FLOPs come from the architecture and the samples-seen budget; runtime from
an assumed per-GPU throughput (``gpu_tflops`` × ``mfu``). The numbers are estimates
for scheduling (``runtime`` must not be too small for SLURM to kill the job), shown
in the dry run as GPU-hours per run and per target.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Mapping

from webssl_repro.config import ConfigError
from webssl_repro.recipes import DINO_DROP_PATH_RATE, SCHEDULE_DEFAULTS, SUBSET_DROP_ABOVE
from webssl_repro.runs import Run

# Crops seen per image by Web-DINO (DINOv2 ViT-g recipe): 2 global + 8 local at 98/224 of the global size.
DINO_GLOBAL, DINO_LOCAL, DINO_LOCAL_RATIO = 2, 8, 98 / 224
MAE_KEEP = 0.25  # MAE encodes the visible quarter of the patches
FWD_BWD = 3.0  # backward ≈ 2 × forward


def dino_local_crop(img_size: int, patch: int) -> int:
    """Local-crop size for a global size: DINOv2 ViT-g's 98/224, on the patch grid."""
    return max(patch, int(round(img_size * DINO_LOCAL_RATIO / patch)) * patch)


def swiglu_hidden(width: int) -> int:
    """DINOv2 ``SwiGLUFFNFused`` hidden size: 2/3 of 4·D, rounded up to a multiple of 8."""
    return (int(4 * width * 2 / 3) + 7) // 8 * 8


def block_params(method: str, width: int, ffn_hidden: int | None = None, ffn: str | None = None) -> int:
    """Parameters of one transformer block (attention + FFN + 2 norms [+ LayerScale]). ``ffn`` is
    the FFN kind where it is not the method's own (``models.arch.Arch.ffn``: an OpenAI-CLIP tower's
    'quick_gelu', a plain two-matrix MLP without LayerScale). Only Web-DINO's and our CLIP's towers
    are SwiGLU; MAE's and the imported I-JEPA's and SigLIP's are plain MLPs."""
    attn = 4 * width * width + 4 * width
    if method not in ("dino", "clip") or ffn not in (None, "swiglu"):
        hidden = ffn_hidden or 4 * width
        ffn = 2 * width * hidden + hidden + width
        extra = 0
    else:
        hidden = ffn_hidden or swiglu_hidden(width)
        ffn = 3 * width * hidden + 2 * hidden + width
        extra = 2 * width  # two LayerScale gammas
    return attn + ffn + 4 * width + extra


def encoder_params(method: str, arch: Mapping[str, Any], img_size: int) -> int:
    """Parameters of ``method``'s tower of shape ``arch`` (a config's ``labels.sizes`` entry, or an
    ``Arch`` as a dict); a pre-norm tower (OpenAI CLIP's) has a LayerNorm where the others have a
    patch-embedding bias, and a tower without a class token (I-JEPA's, SigLIP's) has neither it nor
    its position."""
    width, depth, patch = arch["width"], arch["depth"], arch["patch"]
    cls = 0 if arch.get("class_token") is False else 1
    tokens = (img_size // patch) ** 2 + cls
    embed = 3 * patch * patch * width + width + tokens * width + cls * width  # patch-embed, pos-embed, cls
    if arch.get("pre_norm"):
        embed += width  # the LayerNorm before the blocks, less the patch-embedding bias
    mask_token = width if method == "dino" else 0  # iBOT's; CLIP and MAE towers have none
    blocks = depth * block_params(method, width, arch.get("ffn_hidden"), arch.get("ffn"))
    return embed + mask_token + blocks + 2 * width


def _blocks_flops(method: str, width: int, depth: int, ffn_hidden: int | None, tokens: int) -> float:
    """Forward FLOPs of ``depth`` blocks over ``tokens`` tokens: 2·params per token plus the attention matmuls."""
    return float(2 * depth * block_params(method, width, ffn_hidden) * tokens + 4 * depth * tokens * tokens * width)


def image_tokens(img_size: int, patch: int, token_fraction: float = 1.0) -> int:
    """Tokens of one image through the encoder: the kept share of its patches and the CLS."""
    return max(1, int(((img_size // patch) ** 2) * token_fraction)) + 1


def forward_flops(method: str, arch: Mapping[str, int], img_size: int, token_fraction: float = 1.0) -> float:
    """Forward FLOPs of one image through the encoder."""
    tokens = image_tokens(img_size, arch["patch"], token_fraction)
    return _blocks_flops(method, arch["width"], arch["depth"], arch.get("ffn_hidden"), tokens)


#: The part of a method's model that the encoder's arch does not size, at the defaults of
#: ``methods.mae.MaeConfig`` and ``methods.clip.ClipConfig`` (tests/test_workflow.py keeps them
#: equal), for recipes that leave them unset: MAE's decoder, CLIP's text tower.
COMPANION_DEFAULTS: dict[str, dict[str, float]] = {
    "mae": {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_mlp_ratio": 4.0},
    "clip": {"text_width": 1280, "text_layers": 32, "text_mlp_ratio": 4.0, "context_length": 77},
}


def companion_tower(method: str, recipe: Mapping[str, Any], img_size: int, patch: int) -> tuple[int, int, int, int]:
    """(width, depth, MLP hidden, tokens per sample) of MAE's decoder (over every patch and the
    CLS) or CLIP's text tower (over its context), from the recipe or the methods' defaults."""
    c = {**COMPANION_DEFAULTS[method], **{k: recipe[k] for k in COMPANION_DEFAULTS[method] if k in recipe}}
    if method == "mae":
        width, depth, ratio = int(c["decoder_embed_dim"]), int(c["decoder_depth"]), float(c["decoder_mlp_ratio"])
        return width, depth, int(width * ratio), image_tokens(img_size, patch)
    width, depth, ratio = int(c["text_width"]), int(c["text_layers"]), float(c["text_mlp_ratio"])
    return width, depth, int(width * ratio), int(c["context_length"])


def companion_flops(method: str, recipe: Mapping[str, Any], img_size: int, patch: int) -> float:
    """Forward FLOPs per sample of MAE's decoder or CLIP's text tower, GELU blocks: at ViT-1B ~10 %
    and ~16 % of the encoder's, at ViT-7B ~2 % and ~3 %."""
    if method not in COMPANION_DEFAULTS:
        return 0.0
    width, depth, hidden, tokens = companion_tower(method, recipe, img_size, patch)
    return _blocks_flops("mae", width, depth, hidden, tokens)  # "mae": a GELU MLP block


#: Bytes a transformer block keeps for its backward per token and unit of width, by its MLP, under
#: bf16 autocast with fp32 weights (so the residual stream and the LayerNorms' inputs stay fp32) and
#: a fused attention kernel, which keeps no attention scores: measured with ``saved_tensors_hooks``
#: (tests/test_activation_checkpointing.py). A recomputed block keeps its fp32 input alone.
BLOCK_ACTIVATION_BYTES = {"swiglu": 50, "gelu": 40}
BLOCK_INPUT_BYTES = 4
#: The share of a GPU's memory the activations may take: the rest holds the CUDA context, the
#: rank's shards of weights, gradients and AdamW state, the all-gathered block being run, the
#: heads, and what the allocator cannot reuse.
ACTIVATION_SHARE = 0.85


def checkpointing_setting(cfg: Mapping[str, Any]) -> bool | list[str]:
    """``pretrain.train.activation_checkpointing``: true, false, or run-name patterns (``fnmatch``,
    e.g. ``clip*`` or ``*-518``), each seed alike."""
    setting = cfg.get("pretrain", {}).get("train", {}).get("activation_checkpointing", False)
    if isinstance(setting, bool):
        return setting
    if not isinstance(setting, (list, tuple)) or not all(isinstance(p, str) for p in setting):
        raise ConfigError("pretrain.train.activation_checkpointing must be true, false or a list of run-name "
                          f"patterns, got {setting!r}")
    return list(setting)


def activation_checkpointed(cfg: Mapping[str, Any], run: Run) -> bool:
    """Whether ``run`` recomputes its blocks in the backward (``checkpointing_setting``)."""
    setting = checkpointing_setting(cfg)
    return setting if isinstance(setting, bool) else any(fnmatch.fnmatchcase(str(run), p) for p in setting)


def activation_gb(run: Run, arch: Mapping[str, Any], img_size: int, local: int | None,
                  recipe: Mapping[str, Any], gpus: int, recomputed: bool) -> float:
    """Estimated activations (GB) one GPU keeps for a step's backward: the recipe's batch over
    ``gpus``, through each tower a step backpropagates (Web-DINO's student over its crops, not
    its teacher; MAE's encoder and decoder; CLIP's two towers). Recomputed, each block keeps its
    input and one block at a time its whole activations. An estimate for scheduling, not measured."""
    patch, mlp = int(arch["patch"]), "gelu" if run.method == "mae" else "swiglu"
    # above SUBSET_DROP_ABOVE, stochastic depth runs each branch on (1 - rate) of the batch
    rate = float(recipe.get("drop_path_rate", DINO_DROP_PATH_RATE if run.method == "dino" else 0.0))
    kept = 1.0 - rate if rate > SUBSET_DROP_ABOVE else 1.0
    if run.method == "dino":
        local = local or dino_local_crop(img_size, patch)
        tokens = DINO_GLOBAL * image_tokens(img_size, patch) + DINO_LOCAL * image_tokens(local, patch)
        towers = [(int(arch["width"]), int(arch["depth"]), tokens, BLOCK_ACTIVATION_BYTES[mlp] * kept)]
    else:  # MAE's decoder and CLIP's text tower: GELU blocks without stochastic depth
        encoder = image_tokens(img_size, patch, MAE_KEEP if run.method == "mae" else 1.0)
        width, depth, _, tokens = companion_tower(run.method, recipe, img_size, patch)
        towers = [(int(arch["width"]), int(arch["depth"]), encoder, BLOCK_ACTIVATION_BYTES[mlp] * kept),
                  (width, depth, tokens, BLOCK_ACTIVATION_BYTES["gelu"])]
    images = int(recipe.get("batch_size", SCHEDULE_DEFAULTS[run.method]["batch_size"])) / max(1, gpus)
    total = 0.0
    for width, depth, tokens, per_width in towers:
        block = per_width * width * tokens
        total += (depth * BLOCK_INPUT_BYTES * width * tokens + block) if recomputed else depth * block
    return total * images / 1e9


def dino_local_size(run: Run, cfg: Mapping[str, Any]) -> int:
    """A Web-DINO run's local-crop side: 98/224 of its base crop, which for a hi-res fine-tune is
    its 224 px parent's (App. C: "all other parameters remain exactly the same")."""
    base = run.parent if run.parent is not None else run
    img = int(label(cfg, "resolutions", str(base.res), run))
    return dino_local_crop(img, int(run_arch(cfg, run)["patch"]))


def flops_per_sample(run: Run, arch: Mapping[str, int], img_size: int, local: int | None = None,
                     recipe: Mapping[str, Any] | None = None, recomputed: bool = False) -> float:
    """Training FLOPs of one sample. ``local``: the DINO local-crop side (default: 98/224 of
    ``img_size``); ``recipe``: the run's, for the MAE decoder's and CLIP text tower's sizes;
    ``recomputed``: the trained towers' forward runs again in the backward (not DINO's teacher)."""
    trained = FWD_BWD + (1.0 if recomputed else 0.0)
    if run.method == "dino":
        local = dino_local_crop(img_size, arch["patch"]) if local is None else local
        g = forward_flops("dino", arch, img_size)
        return DINO_GLOBAL * g * (1 + trained) + DINO_LOCAL * trained * forward_flops("dino", arch, local)
    encoder = forward_flops(run.method, arch, img_size, MAE_KEEP if run.method == "mae" else 1.0)
    return trained * (encoder + companion_flops(run.method, recipe or {}, img_size, arch["patch"]))


def label(cfg: Mapping[str, Any], kind: str, key: str, run: Any) -> Any:
    """``labels.{kind}[key]``, the number behind one of ``run``'s labels, or a ``ConfigError``
    naming the missing label and the ones the config has."""
    table = cfg.get("labels", {}).get(kind, {})
    if key not in table:
        raise ConfigError(f"config labels.{kind} has no entry {key!r} (run {run}); it has {sorted(table)}")
    return table[key]


def method_arch(size: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The shape of ``method``'s tower of a ``labels.sizes`` entry. The entry's ``ffn_hidden`` is the
    SwiGLU width of the Web-DINO and CLIP towers; a Web-MAE tower has a GELU MLP of 4·width as
    released, and takes the entry's ``mae`` overrides (e.g. the released MAE-300M's patch 16)."""
    spec = dict(size)
    mae = spec.pop("mae", {})
    if method == "mae":
        spec.pop("ffn_hidden", None)
        spec.update(mae)
    return spec


def run_arch(cfg: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The shape of ``run``'s tower (``method_arch`` of its size's label)."""
    return method_arch(label(cfg, "sizes", run.size, run), run.method)


IMAGENET_TRAIN_IMAGES = 1281167


def in1k_images(cfg: Mapping[str, Any]) -> int:
    """Images of one ImageNet-1k epoch: ``labels.in1k_images``, else the generated stand-in's
    ``data.in1k.n_images`` where ``data.in1k`` names no shards, else ImageNet's train set."""
    labels, in1k = cfg.get("labels", {}), cfg.get("data", {}).get("in1k", {})
    if "in1k_images" in labels:
        return int(labels["in1k_images"])
    if "shards" not in in1k:
        from webssl_repro.data.stages import IN1K_DEFAULTS

        return int(in1k.get("n_images", IN1K_DEFAULTS["n_images"]))
    return IMAGENET_TRAIN_IMAGES


def samples_of(run: Run, cfg: Mapping[str, Any]) -> int:
    labels = cfg["labels"]
    if run.parent is not None:  # hi-res fine-tune: steps × batch of its own recipe (hires_recipe's)
        pretrain = cfg.get("pretrain", {})
        hires = pretrain.get("hires", {})
        batch = hires.get(run.method, {}).get("batch_size", pretrain.get(run.method, {}).get("batch_size"))
        if batch is None:
            raise ConfigError(f"pretrain.hires.{run.method}.batch_size: {run} counts its samples as steps x batch; "
                              f"set it, or pretrain.{run.method}.batch_size, which it otherwise takes")
        return int(hires.get("steps", 0)) * int(batch)
    if run.data == "in1k":
        return int(labels["in1k_epochs"]) * in1k_images(cfg)
    return int(label(cfg, "samples", run.samples, run))


#: Retries a pretraining job keeps for preemptions and node failures, beyond the jobs its
#: capped runtime needs (the profile's ``retries``, which a rule's own directive replaces).
PREEMPTION_RETRIES = 2
#: The chain's jobs are counted at ``resources.mfu``; a run that trains slower needs more. A
#: quarter more follow-up jobs covers an MFU of 0.28 against 0.35 on a long chain; retries beyond
#: need are cheap, since the attempts guard refuses futile ones on a one-core allocation
#: (``REFUSED_ATTEMPT``).
CHAIN_SLACK = 1.25


def chain_retries(jobs: int) -> int:
    """Retries (a rule's ``retries``, submitit's timeouts) for a run of ``jobs`` time-limited jobs:
    its follow-up jobs and ``CHAIN_SLACK`` more, plus ``PREEMPTION_RETRIES``."""
    return math.ceil((jobs - 1) * CHAIN_SLACK) + PREEMPTION_RETRIES


#: Seconds torchrun gives its workers after a signal (SLURM's preemption SIGTERM) before it kills
#: them. Its own default, 30 s, is less than a step and a save of a multi-billion-parameter run
#: take; SLURM's kill at the partition's ``GraceTime`` is what should end a preempted save. The
#: same wait follows an error of torchrun's own (its rendezvous or store); after a worker's crash
#: torchrun stops the others within its fixed 30 s.
TORCHRUN_SHUTDOWN_TIMEOUT_S = 600
#: torchrun's own variable for it (its ``--shutdown-timeout``): releases without the option
#: ignore the variable and keep their 30 s, where an unknown option would stop the job.
TORCHRUN_SHUTDOWN_VAR = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def torchrun(args: str) -> str:
    """``torchrun ARGS`` as the jobs' launchers spell it, with ``TORCHRUN_SHUTDOWN_TIMEOUT_S``."""
    return f"env {TORCHRUN_SHUTDOWN_VAR}={TORCHRUN_SHUTDOWN_TIMEOUT_S} torchrun {args}"


@dataclass(frozen=True)
class RunResources:
    gpus: int
    nodes: int
    runtime_min: int  # one job's time limit: the estimate, capped at resources.max_runtime_min
    mem_mb: int
    cpus_per_task: int
    train_flops: float  # with the trained towers' forward twice where recomputed (activation_checkpointed)
    total_min: int  # the whole run's estimated runtime
    activation_gb: float = 0.0  # per GPU, estimated (activation_gb)
    recomputed: bool = False  # its blocks recomputed in the backward (activation_checkpointed)

    @property
    def jobs(self) -> int:
        """Time-limited jobs the run needs: each ends at its limit (SIGTERM: the trainer
        checkpoints and exits) and the next resumes from the checkpoint."""
        return math.ceil(self.total_min / self.runtime_min)

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.total_min / 60.0

    def snakemake(self) -> dict[str, Any]:
        """Resources for the rule. Multi-node jobs go through ``srun`` (design.md §7)."""
        base = {"runtime": self.runtime_min, "mem_mb": self.mem_mb, "cpus_per_task": self.cpus_per_task}
        if self.gpus == 0:
            return base
        if self.nodes == 1:  # torchrun --standalone: the GPUs on one node, wherever nodes have fewer
            return {**base, "gpu": self.gpus, "nodes": 1}
        return {**base, "nodes": self.nodes, "tasks": self.nodes, "tasks_per_gpu": 0, "mpi": "srun",
                "gres": f"gpu:{self.gpus // self.nodes}", "slurm_extra": "--ntasks-per-node=1 --exclusive"}


def node_share(res_cfg: Mapping[str, Any], gpus: int) -> dict[str, int]:
    """A one-node job's share of a node for its ``gpus``: that fraction of the node's memory and
    ``cpus_per_gpu`` CPUs per GPU (without it, the profile's default memory, 16 GB, is less than
    an 8B LM's weights or the loader workers of a GPU filter need)."""
    share = min(1.0, gpus / max(1, int(res_cfg.get("gpus_per_node", gpus))))
    return {"nodes": 1, "mem_mb": int(int(res_cfg["mem_mb_per_node"]) * share),
            "cpus_per_task": int(res_cfg["cpus_per_gpu"]) * gpus}


def lm_gpus(gpus_by_lm: Mapping[str, int], lm_paths: Mapping[str, str], lm: str) -> int:
    """The GPUs of language model ``lm``'s features job (``resources.lm_gpus``): its own entry,
    else that of the ``lm_paths`` key whose value ``lm`` is (a hub id named directly gets the
    GPUs set for its short name), else one."""
    from webssl_repro.files import lm_entry

    gpus = lm_entry(gpus_by_lm, lm_paths, lm)
    return 1 if gpus is None else int(gpus)


#: The job of an attempt that its guard will refuse (``train.attempts.predicts_refusal``).
#: Snakemake submits every retry, and a refused one exits in seconds: ten minutes of one core
#: and no GPU keep it from queueing for, and holding, the run's nodes. Not an MPI job either:
#: the SLURM plugin rejects ``mpi`` with a single task.
REFUSED_ATTEMPT: dict[str, Any] = {"runtime": 10, "mem_mb": 2000, "cpus_per_task": 1, "gpu": 0, "nodes": 1,
                                   "tasks": 1, "tasks_per_gpu": 0, "mpi": "", "gres": "", "slurm_extra": ""}


def pretrain_resources(run: Run, cfg: Mapping[str, Any], recipe: Mapping[str, Any] | None = None) -> RunResources:
    """``recipe``: the run's (``workflow.Plan.recipe``): its DINO local-crop side where it sets one
    (default: ``dino_local_size``), its MAE decoder or CLIP text tower (default: the methods')."""
    res_cfg = cfg["resources"]
    arch = run_arch(cfg, run)
    img = int(label(cfg, "resolutions", str(run.res), run))
    recipe = recipe or {}
    local = recipe.get("local_crop_size") if run.method == "dino" else None
    if run.method == "dino" and local is None:
        local = dino_local_size(run, cfg)
    local = None if local is None else int(local)
    recomputed = activation_checkpointed(cfg, run)
    flops = flops_per_sample(run, arch, img, local, recipe, recomputed) * samples_of(run, cfg)
    if run.size not in res_cfg["nodes"]:
        raise ConfigError(f"config resources.nodes has no entry for size {run.size!r} (run {run}): "
                       f"sizes there are {sorted(res_cfg['nodes'])}")
    nodes = int(res_cfg["nodes"][run.size])
    if run.parent is not None:
        nodes = max(1, nodes // 2)  # the hi-res fine-tune is short; half the nodes suffice
    gpus = nodes * int(res_cfg["gpus_per_node"])
    throughput = max(gpus, 1) * float(res_cfg["gpu_tflops"]) * 1e12 * float(res_cfg["mfu"])
    estimate = max(int(res_cfg["min_runtime_min"]), math.ceil(1.1 * flops / throughput / 60.0))
    runtime = min(estimate, int(res_cfg.get("max_runtime_min") or estimate))
    cpus = max(1, int(res_cfg["cpus_per_gpu"]) * max(1, gpus // nodes))
    memory = activation_gb(run, arch, img, local, recipe, gpus, recomputed)
    return RunResources(gpus, nodes, runtime, int(res_cfg["mem_mb_per_node"]), cpus, flops, estimate, memory,
                        recomputed)
