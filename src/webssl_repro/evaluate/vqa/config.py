"""The VQA probe's configuration: the paper's recipe (Table 5, Cambrian-1's scripts) by default,
overridden by name from ``evaluate.vqa``."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from webssl_repro.config import check_keys
from webssl_repro.metrics import VQA_BENCHMARKS
# ``VqaConfig.precision`` means what the pretraining loop's does: fp32 weights and AdamW state
# (Cambrian trains fp32 weights), ``bf16`` autocasting the forward on CUDA.
from webssl_repro.train.config import PRECISIONS


#: Cambrian / LLaVA projectors: one Linear, or ``mlp{N}x_gelu`` (``probe.build_projector``)
PROJECTOR = re.compile(r"linear|mlp([1-9][0-9]*)x_gelu")


#: Keys of ``evaluate.vqa`` that only the answering reads: changing them reruns the ``vqa`` job,
#: which answers the benchmarks with the trained probe, not the ``vqa_probe`` job that trains it.
ANSWER_KEYS = ("max_new_tokens", "max_new_tokens_by_benchmark", "eval_batch_size")
#: The same within ``evaluate.vqa.data`` (paper scale): which benchmarks, and how many questions.
ANSWER_DATA_KEYS = ("benchmarks", "benchmark_limit")


def probe_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluate.vqa`` less what only the answering reads (``ANSWER_KEYS``): what the trained
    probe depends on."""
    out = {k: v for k, v in section.items() if k not in ANSWER_KEYS}
    if isinstance(out.get("data"), Mapping):
        out["data"] = {k: v for k, v in out["data"].items() if k not in ANSWER_DATA_KEYS}
    return out


@dataclass
class StageConfig:
    """One training stage; ``batch_size`` is global (reached by accumulating micro-batches)."""

    lr: float
    weight_decay: float = 0.0
    batch_size: int = 512
    micro_batch_size: int = 16
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_steps: Optional[int] = None
    #: Train the LM too (None: stage 2 only, the paper's recipe; a from-scratch mini LM has no language
    #: to keep frozen, so mini stage 1 may train it on the captions).
    train_lm: Optional[bool] = None
    #: Cambrian's device batch (its scripts: 8): the loss the mean of each device batch's mean
    #: (``batching``). None: the mean over the global batch.
    per_device_batch: Optional[int] = None
    #: with ``per_device_batch``, order each epoch by modality and length (LLaVA's sampler), as
    #: Cambrian's fine-tuning script asks; its adapter pre-training draws a plain random order
    group_by_modality_length: bool = True


@dataclass
class VqaConfig:
    """Paper defaults (Table 5, Cambrian-1 scripts); ``from_mapping`` overrides by name.

    Stage-1 lr: Table 5 prints 1e-5, but the paper says it follows Cambrian-1, whose
    released adapter-pretraining script uses 1e-3; a freshly initialised projector trained
    for one epoch with the LM frozen barely moves at 1e-5, so 1e-5 is most likely a typo.
    We default to 1e-3 and keep 1e-5 one config line away (``stage1: {lr: 1.0e-5}``).
    """

    language_model: str = "meta-llama/Meta-Llama-3-8B-Instruct"  # or "tiny" (mini)
    #: the hub commit (or tag) its weights, tokenizer and generation config are read at; none:
    #: the repository's newest (Llama-3-Instruct's end tokens changed after its release)
    language_model_revision: Optional[str] = None
    tokens: int = 576
    projector: str = "mlp2x_gelu"
    chat_format: str = "llama_3"
    max_length: int = 2048
    #: the longest answer generated; ``max_new_tokens_by_benchmark`` sets shorter ones (Cambrian's
    #: eval scripts: 512, but 128 for GQA, ChartQA and DocVQA, 32 for MME)
    max_new_tokens: int = 512
    max_new_tokens_by_benchmark: dict[str, int] = field(
        default_factory=lambda: {"gqa": 128, "chartqa": 128, "docvqa": 128, "mme": 32})
    eval_batch_size: int = 16
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    seed: int = 0
    #: ``none`` (one process), ``ddp`` or ``fsdp2`` over the ranks of a torchrun launch (``vqa.distributed``).
    strategy: str = "none"
    #: fp32 weights either way; ``bf16`` autocasts the forward on CUDA (``PRECISIONS``).
    precision: str = "bf16"
    #: recompute each decoder layer in the backward (HF's gradient checkpointing), so that an
    #: 8B LM's activations fit beside its shards (paper scale)
    gradient_checkpointing: bool = False
    stage1: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-3, warmup_ratio=0.06,
                                                                    group_by_modality_length=False))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(lr=4e-5, warmup_ratio=0.03))

    @classmethod
    def from_mapping(cls, mapping: Optional[Mapping[str, Any]] = None) -> "VqaConfig":
        mapping = dict(mapping or {})
        names = {f.name for f in fields(cls)}
        check_keys(mapping, names, "evaluate.vqa")
        cfg = cls()
        for key, value in mapping.items():
            if key in ("stage1", "stage2"):
                base = getattr(cfg, key)
                check_keys(value, {f.name for f in fields(StageConfig)}, f"evaluate.vqa.{key}")
                value = StageConfig(**{**base.__dict__, **value})
            elif key == "max_new_tokens_by_benchmark":  # over Cambrian's limits, not instead of them
                value = {**cfg.max_new_tokens_by_benchmark, **value}
            setattr(cfg, key, value)
        unknown = sorted(set(cfg.max_new_tokens_by_benchmark) - set(VQA_BENCHMARKS))
        if unknown:
            raise KeyError(f"evaluate.vqa.max_new_tokens_by_benchmark: unknown benchmark(s) {unknown}; "
                           f"known: {list(VQA_BENCHMARKS)}")
        if math.isqrt(int(cfg.tokens)) ** 2 != int(cfg.tokens):  # the encoder's grid is pooled to a square
            raise ValueError(f"evaluate.vqa.tokens: {cfg.tokens} is not a square number of visual tokens "
                             f"(the paper's 576 = 24 x 24)")
        for key in ("stage1", "stage2"):
            stage = getattr(cfg, key)
            if stage.per_device_batch and stage.batch_size % stage.per_device_batch:
                raise ValueError(f"evaluate.vqa.{key}: batch_size {stage.batch_size} does not divide into device "
                                 f"batches of per_device_batch {stage.per_device_batch}")
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"evaluate.vqa.precision: {cfg.precision!r} is not one of {PRECISIONS}")
        if not PROJECTOR.fullmatch(str(cfg.projector)):
            raise ValueError(f"evaluate.vqa.projector: {cfg.projector!r} is not 'linear' or 'mlp<N>x_gelu' (N >= 1)")
        if cfg.language_model_revision and cfg.language_model == "tiny":
            raise ValueError(f"evaluate.vqa.language_model_revision: {cfg.language_model_revision!r} pins a hub id's "
                             "commit, but evaluate.vqa.language_model is 'tiny' (built here); set the revision to null")
        from webssl_repro.files import pinned_revision

        pinned_revision(cfg.language_model_revision, cfg.language_model, "evaluate.vqa.language_model_revision",
                        "evaluate.vqa.language_model")
        from webssl_repro.evaluate.vqa.data import CHAT_FORMATS

        if cfg.chat_format not in CHAT_FORMATS:
            raise ValueError(f"evaluate.vqa.chat_format: {cfg.chat_format!r} is not one of {sorted(CHAT_FORMATS)}")
        return cfg

    def new_tokens(self, benchmark: str) -> int:
        """How many tokens ``benchmark``'s answers may take: its own limit, capped by ``max_new_tokens``."""
        return min(int(self.max_new_tokens_by_benchmark.get(benchmark, self.max_new_tokens)), int(self.max_new_tokens))
