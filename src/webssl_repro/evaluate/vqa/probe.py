"""The Cambrian VQA probe: frozen-encoder tokens → MLP projector → causal LM.

One code path for both scales; only ``VqaConfig`` differs (Llama-3-8B-Instruct, 576 tokens
and Cambrian data at paper scale; a tiny Llama trained from scratch on mini-web at mini
scale). Everything trainable lives in submodules (``projector``, ``lm``) so the training
loop can wrap the probe in FSDP without special cases.
"""
from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from webssl_repro.evaluate.progress import EvalProgress
from webssl_repro.evaluate.vqa.answering import Scorer, answer_rounds, evaluate_vqa
from webssl_repro.evaluate.vqa.batching import CambrianBatches
from webssl_repro.evaluate.vqa.config import PROJECTOR, StageConfig, VqaConfig
from webssl_repro.evaluate.vqa.data import (CHAT_FORMATS, IGNORE, MINI_CHAT, ChatFormat, FeatureCache, VqaSample,
                                            collate, encode, pad_id)
from webssl_repro.evaluate.vqa.lm import lm_hidden_size
from webssl_repro.evaluate.vqa.stage_state import load_stage, save_stage
# ``VqaConfig.precision`` means what the pretraining loop's does: fp32 weights and AdamW state
# (Cambrian trains fp32 weights), ``bf16`` autocasting the forward on CUDA.
from webssl_repro.train.config import PRECISIONS

if TYPE_CHECKING:
    from webssl_repro.evaluate.vqa.distributed import Parallel

def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the probe's forward: bf16 on CUDA for ``bf16``, else none (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"evaluate.vqa.precision: {precision!r} is not one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


def autocast_context(precision: str, device: torch.device):
    """The forward's autocast (``autocast_dtype``), or none. No cast cache: cached bf16 copies
    of every layer's weights would outlive their layer (16 GB for an 8B LM) and defeat
    activation checkpointing."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


def build_projector(kind: str, vis_dim: int, lm_dim: int) -> nn.Sequential:
    """Cambrian/LLaVA ``mlp{N}x_gelu``: Linear(vis→lm), then (N−1)×[GELU, Linear(lm→lm)]."""
    m = PROJECTOR.fullmatch(kind)
    if not m:
        raise ValueError(f"unknown projector {kind!r}; expected 'linear' or 'mlp<N>x_gelu'")
    if kind == "linear":
        return nn.Sequential(nn.Linear(vis_dim, lm_dim))
    layers: list[nn.Module] = [nn.Linear(vis_dim, lm_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(lm_dim, lm_dim)]
    return nn.Sequential(*layers)


class MultimodalProbe(nn.Module):
    """inputs_embeds = text embeddings with the image slots replaced by projected visual tokens."""

    def __init__(self, lm: nn.Module, tokenizer: Any, vis_dim: int, *, tokens: int,
                 chat: ChatFormat = MINI_CHAT, projector: str = "mlp2x_gelu"):
        super().__init__()
        self.lm = lm
        self.projector = build_projector(projector, vis_dim, lm_hidden_size(lm))
        self.tokenizer = tokenizer
        self.chat = chat
        self.tokens = tokens
        #: where an answer ends: the chat's stop token and the LM's own end tokens, as HF's
        #: ``generate`` stops (Llama-3-Instruct: <|eot_id|> and <|end_of_text|>)
        self.stop_ids = sorted({int(tokenizer.convert_tokens_to_ids(chat.stop)), *_end_tokens(lm)})
        #: Run the projector (and keep it in the autograd graph) for image-free batches too, so that
        #: data-parallel ranks agree on its gradients and collectives (set by ``vqa.distributed``).
        self.project_without_images = False
        #: the training loss may apply the LM head to the answer positions alone (``forward``)
        self.answer_head_only = plain_lm_head(lm)
        #: ``VqaConfig.precision``; the forward autocasts as ``autocast_dtype`` says for its device.
        self.precision = "fp32"

    def _autocast(self, device: torch.device):
        return autocast_context(self.precision, device)

    def embed(self, visual: torch.Tensor, input_ids: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(input_ids)
        has_image = image_mask.any(1)
        if not has_image.any():
            if self.project_without_images:  # a real forward: FSDP2 ranks all-gather the projector together
                first = self.projector[0]
                zero = self.projector(emb.new_zeros(1, first.in_features, dtype=first.weight.dtype))
                return emb + zero.sum().to(emb.dtype) * 0
            return emb
        vis = visual[has_image.to(visual.device)].to(device=emb.device)
        proj = self.projector(vis.to(self.projector[0].weight.dtype)).to(emb.dtype)
        if int(image_mask.sum()) != proj.shape[0] * proj.shape[1]:
            raise ValueError(f"{int(image_mask.sum())} image slots for {proj.shape[0]}x{proj.shape[1]} visual tokens")
        return emb.masked_scatter(image_mask[..., None], proj)

    def forward(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                answer_weights: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Logits; given labels instead, the answer-token loss (``loss_sum``/``n_answer`` and their
        mean) and the logits of the answer positions only (``answer_logits``, in their order):
        a 16 x 2048-token batch's full logits over Llama-3's 128k vocabulary would take ~40 GB.
        ``answer_weights`` (one per sample) weighs each sample's tokens in ``loss_sum``."""
        with self._autocast(input_ids.device):
            emb = self.embed(visual, input_ids, image_mask)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if labels is None:
                return {"logits": self.lm(inputs_embeds=emb, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).logits}
            target = labels[:, 1:].to(emb.device)
            answer = target != IGNORE
            if self.answer_head_only:
                hidden = self.lm.get_decoder()(inputs_embeds=emb, attention_mask=attention_mask,
                                               position_ids=position_ids, use_cache=False).last_hidden_state
                logits = self.lm.get_output_embeddings()(hidden[:, :-1][answer])
            else:
                logits = self.lm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).logits[:, :-1][answer]
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least: bf16 is upcast
        if answer_weights is None:
            loss_sum = F.cross_entropy(logits32, target[answer], reduction="sum")
        else:
            rows = answer.nonzero()[:, 0]  # each answer token's sample, in the logits' order
            loss_sum = (F.cross_entropy(logits32, target[answer], reduction="none")
                        * answer_weights.to(logits32)[rows]).sum()
        n = answer.sum()
        return {"answer_logits": logits, "loss_sum": loss_sum, "n_answer": n, "loss": loss_sum / n.clamp(min=1)}

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_mask: torch.Tensor, max_new_tokens: int = 32,
                 all_finished: Optional[Callable[[bool], bool]] = None) -> list[list[int]]:
        """Greedy decoding with a KV cache for a LEFT-padded batch; stops at the chat's stop token
        or one of the LM's end tokens (``stop_ids``).

        Position ids count real tokens only, so a padded prompt sees exactly the positions it
        would see alone: in fp32 on CPU batched output equals one-by-one output. In bf16 on a GPU
        the padded shapes take other kernels, so a near-tie between two tokens may break the
        other way (Cambrian answers one question at a time; ``eval_batch_size: 1`` does too).
        ``all_finished`` (FSDP2
        ranks) turns "this batch is done" into "every rank's batch is done", so that all ranks
        run the same number of forwards; extra steps change no finished answer.
        """
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left padding (every prompt must end at the last column)")
        was_training = self.training
        self.eval()
        try:
            with self._autocast(input_ids.device):
                return self._greedy(visual, input_ids, attention_mask, image_mask, max_new_tokens, all_finished)
        finally:
            self.train(was_training)

    def _greedy(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, max_new_tokens: int,
                all_finished: Optional[Callable[[bool], bool]]) -> list[list[int]]:
        emb = self.embed(visual, input_ids, image_mask)
        mask = attention_mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = _decode_kwargs(self.lm)
        out = self.lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        B = input_ids.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        result: list[list[int]] = [[] for _ in range(B)]
        stops = torch.tensor(self.stop_ids, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            ends = torch.isin(nxt, stops)
            for i, (tok, finished, end) in enumerate(zip(nxt.tolist(), done.tolist(), ends.tolist())):
                if not finished and not end:
                    result[i].append(tok)
            done |= ends
            finished = bool(done.all())
            if all_finished(finished) if all_finished is not None else finished:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            pos = pos[:, -1:] + 1
            past = out.cache if hasattr(out, "cache") else out.past_key_values
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                          **{_cache_name(self.lm): past}, **kw)
        return result

    def batch(self, samples: Sequence[VqaSample], features: FeatureCache, *, with_answer: bool,
              max_length: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc = [encode(self.tokenizer, self.chat, s, self.tokens, with_answer, max_length) for s in samples]
        t = collate(enc, pad_id(self.tokenizer), side="right" if with_answer else "left")
        return features.batch([s.image_id for s in samples]), t

    def answer_batch(self, samples: Sequence[VqaSample], features: FeatureCache, max_new_tokens: int = 32,
                     all_finished: Optional[Callable[[bool], bool]] = None) -> list[str]:
        """Greedy answers to one batch as text (special tokens dropped)."""
        device = next(self.parameters()).device
        visual, t = self.batch(samples, features, with_answer=False)
        ids = self.generate(visual.to(device), t["input_ids"].to(device), t["attention_mask"].to(device),
                            t["image_mask"].to(device), max_new_tokens, all_finished=all_finished)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]

    def answer(self, samples: Sequence[VqaSample], features: FeatureCache, batch_size: int = 16,
               max_new_tokens: int = 32, parallel: Optional["Parallel"] = None) -> list[str]:
        """Greedy answers to ``samples`` in batches of ``batch_size``; with ``parallel``, the
        batches are shared among the ranks and every rank gets all answers, in order."""
        return [a for found in answer_rounds(self, samples, features, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, parallel=parallel) for a in found]


def _end_tokens(lm: nn.Module) -> list[int]:
    """The LM's generation end tokens (``generation_config.eos_token_id``: an id or a list)."""
    ends = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if ends is None:
        return []
    return [int(t) for t in (ends if isinstance(ends, (list, tuple)) else [ends])]


def _forward_params(lm: nn.Module) -> set[str]:
    return set(inspect.signature(lm.forward).parameters)


def _cache_name(lm: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    return "cache" if "cache" in _forward_params(lm) else "past_key_values"


def _decode_kwargs(lm: nn.Module) -> dict[str, int]:
    """Only the last position's logits: a 128k-vocab LM would otherwise materialise B×L×V."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(lm) else {}


# ---------------------------------------------------------------- training and evaluation


def backward_global_batch(probe: MultimodalProbe, micro_batches: Sequence[Sequence[VqaSample]],
                          features: FeatureCache, max_length: Optional[int] = None, *,
                          parallel: Optional["Parallel"] = None, module: Optional[nn.Module] = None,
                          weights: Optional[Sequence[Sequence[float]]] = None) -> float:
    """Accumulate gradients of the mean answer-token CE over all micro-batches; returns that loss.

    Each micro-batch's summed CE is divided by the GLOBAL answer-token count, so the gradient
    does not depend on how the global batch is split (nor on how many tokens each split holds).
    ``weights`` (per sample of each micro-batch, ``batching.device_batch_weights``) replace that
    count: Cambrian's mean of its device batches' means. With ``parallel``, ``micro_batches`` are
    this rank's share: the count is summed over ranks, the loss scaled by the world size (the
    gradient collectives average), and ``module`` (the DDP wrapper or the sharded probe) runs the forward.
    """
    device = next(probe.parameters()).device
    module = probe if module is None else module
    batches = [probe.batch(m, features, with_answer=True, max_length=max_length) for m in micro_batches]
    if weights is None:
        local = sum(int((t["labels"][:, 1:] != IGNORE).sum()) for _, t in batches)
        total = max(1, local if parallel is None else round(parallel.sum(local)))
    scale = 1 if parallel is None else parallel.world_size
    step_loss = 0.0
    for i, (visual, t) in enumerate(batches):
        ctx = parallel.accumulate(module, last=i == len(batches) - 1) if parallel is not None else nullcontext()
        with ctx:
            extra = {} if weights is None else {
                "answer_weights": torch.tensor(weights[i], dtype=torch.float64, device=device)}
            out = module(visual.to(device), **{k: v.to(device) for k, v in t.items()}, **extra)
            loss = out["loss_sum"] if weights is not None else out["loss_sum"] / total
            if loss.requires_grad:  # not so for an image-free micro-batch while the LM is frozen
                (loss * scale if scale != 1 else loss).backward()
        step_loss += float(loss.detach())
    return step_loss if parallel is None else parallel.sum(step_loss)


def train_stage(probe: MultimodalProbe, samples: Sequence[VqaSample], features: FeatureCache, stage: int,
                cfg: StageConfig, *, max_length: Optional[int] = None, seed: int = 0,
                on_step: Optional[Callable[[int, float], None]] = None,
                parallel: Optional["Parallel"] = None, progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """Stage 1 trains the projector only (LM frozen), stage 2 the projector and the LM, unless
    ``cfg.train_lm`` says otherwise (a from-scratch mini LM is trained in stage 1 too).

    AdamW + linear warmup + cosine decay (HF Trainer's schedule, as Cambrian uses); the loss of
    a global batch is the mean CE over all its answer tokens, or with ``cfg.per_device_batch``
    the mean of its device batches' means (``batching``), however it is split into micro-batches
    (and, with ``parallel``, over ranks: each takes its slice of every global batch).
    With ``progress`` the stage is its part ``stage<n>``: saved when due and at its end
    (``stage_state``), resumed from there, a finished stage loaded instead of trained.
    """
    from transformers import get_cosine_schedule_with_warmup

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if not samples:
        raise ValueError("train_stage: no samples")
    probe.lm.requires_grad_(stage == 2 if cfg.train_lm is None else bool(cfg.train_lm))
    probe.projector.requires_grad_(True)
    params = [p for p in probe.parameters() if p.requires_grad]
    module = parallel.training_module(probe) if parallel is not None else probe
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(samples) / cfg.batch_size))
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * steps), steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    progress = EvalProgress() if progress is None else progress
    part, start, spent = f"stage{stage}", 0, 0.0
    found = progress.latest(part)
    if found is not None:
        extra = load_stage(found[1], module, opt)
        start, losses, spent = int(extra["step"]), list(extra["losses"]), float(extra["seconds"])
        order = extra["order"].tolist()
        gen.set_state(extra["generator"])
        sched.load_state_dict(extra["scheduler"])
    t0 = time.perf_counter()

    def extra_state(done: int) -> dict[str, Any]:
        return {"step": done, "losses": list(losses), "seconds": spent + time.perf_counter() - t0,
                "order": torch.tensor(order, dtype=torch.long), "generator": gen.get_state(),
                "scheduler": sched.state_dict()}

    cambrian = CambrianBatches(probe, samples, cfg, max_length) if cfg.per_device_batch else None
    probe.train()
    for step in range(start, steps):
        while len(order) < cfg.batch_size:
            order += cambrian.epoch(gen) if cambrian else torch.randperm(len(samples), generator=gen).tolist()
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        weights = cambrian.weights(idx) if cambrian else None
        if parallel is not None:
            idx = parallel.local_indices(idx, cfg.micro_batch_size)
            weights = parallel.local_indices(weights, cfg.micro_batch_size) if weights else None
        cut = range(0, len(idx), cfg.micro_batch_size)
        micro = [[samples[i] for i in idx[k:k + cfg.micro_batch_size]] for k in cut]
        opt.zero_grad(set_to_none=True)
        step_loss = backward_global_batch(probe, micro, features, max_length, parallel=parallel, module=module,
                                          weights=[weights[k:k + cfg.micro_batch_size] for k in cut] if weights else None)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
        progress.iteration_done(part, step + 1, steps,
                                lambda d: save_stage(d, module, opt, extra_state(step + 1)))
    if start < steps:  # the finished stage's weights, for a job stopped before the next part is saved
        progress.save(part, steps, lambda d: save_stage(d, module, None, extra_state(steps)))
    return {"stage": stage, "steps": steps, "losses": losses, "seconds": spent + time.perf_counter() - t0}


def build_probe(cfg: VqaConfig, vis_dim: int, tokenizer: Any = None) -> MultimodalProbe:
    """The probe a config names: ``language_model: tiny`` builds a fresh Llama for ``tokenizer``
    (mini); anything else is a hub id/path loaded with its own tokenizer (paper: Llama-3-8B-Instruct).
    Under ``strategy: fsdp2`` the loaded probe is on the host of rank 0 only, the other ranks' on
    the meta device: sharding (``vqa.distributed.parallelize``) gives each its part of rank 0's."""
    from webssl_repro.evaluate.vqa.lm import build_tiny_lm, load_lm, load_tokenizer
    from webssl_repro.train.distributed import shard_receiver

    receiver = None if cfg.language_model == "tiny" else shard_receiver(cfg.strategy)

    if cfg.language_model == "tiny":
        if tokenizer is None:
            raise ValueError("build_probe: a tiny LM needs the tokenizer built from the instruction texts")
        lm = build_tiny_lm(len(tokenizer), cfg.lm_hidden, cfg.lm_layers, cfg.lm_heads, max_positions=cfg.max_length,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, seed=cfg.seed)
    else:
        revision = cfg.language_model_revision
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.language_model, revision)
        lm = load_lm(cfg.language_model, weights=receiver is None, revision=revision)
    torch.manual_seed(cfg.seed)
    with torch.device("meta") if receiver is not None else nullcontext():
        probe = MultimodalProbe(lm, tokenizer, vis_dim, tokens=cfg.tokens, chat=CHAT_FORMATS[cfg.chat_format],
                                projector=cfg.projector)
    probe.precision = cfg.precision
    if cfg.gradient_checkpointing:
        checkpoint_layers(lm)
    return probe


def checkpoint_layers(lm: nn.Module) -> None:
    """Recompute each decoder layer in the backward (non-reentrant; FSDP2 all-gathers a layer
    again before its backward). transformers 5 renamed the call, 4.x has the old name only.
    Non-reentrant checkpointing needs no grad on the embeddings, and the hook transformers 5
    adds for it would send image-free stage-1 batches through a backward of the frozen LM."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(lm, "disable_input_require_grads"):
        lm.disable_input_require_grads()


def plain_lm_head(lm: nn.Module) -> bool:
    """Whether the LM's logits are just its output embedding applied to its decoder's output:
    not Cohere's ``logit_scale``, Granite's ``logits_scaling`` or Gemma 2/3's final softcap,
    which only the LM's own forward applies."""
    cfg = getattr(lm, "config", None)
    if cfg is None or not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
        return False
    return (getattr(cfg, "logit_scale", None) in (None, 1.0) and getattr(cfg, "logits_scaling", None) in (None, 1.0)
            and getattr(cfg, "final_logit_softcapping", None) is None)


def fit_probe(cfg: VqaConfig, probe: MultimodalProbe, features: FeatureCache,
              alignment: Sequence[VqaSample], instruction: Sequence[VqaSample],
              progress: Optional[EvalProgress] = None) -> tuple[Optional["Parallel"], list[dict[str, Any]]]:
    """Stage 1 on alignment data, stage 2 on instruction data: the probe's training.

    ``cfg.strategy`` other than ``none`` shards the probe (in place) over the torchrun ranks;
    returns that (``vqa.distributed.Parallel``, None for one process) and each stage's log
    (steps, seconds, final loss). ``progress`` (the job's) keeps each stage as a part.
    """
    from webssl_repro.evaluate.vqa.distributed import parallelize

    parallel = parallelize(probe, cfg.strategy)
    logs = [train_stage(probe, samples, features, stage, scfg, max_length=cfg.max_length, seed=cfg.seed + stage,
                        parallel=parallel, progress=progress)
            for stage, samples, scfg in ((1, alignment, cfg.stage1), (2, instruction, cfg.stage2))]
    return parallel, [{k: log[k] for k in ("stage", "steps", "seconds")} | {"final_loss": log["losses"][-1]}
                      for log in logs]


def answer_benchmarks(cfg: VqaConfig, probe: MultimodalProbe, features: FeatureCache,
                      benchmark_sets: Mapping[str, Sequence[VqaSample]], scorer: Optional[Scorer] = None,
                      parallel: Optional["Parallel"] = None, progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """``evaluate_vqa`` with the config's batch size and answer limits."""
    return evaluate_vqa(probe, benchmark_sets, scorer, features=features, batch_size=cfg.eval_batch_size,
                        max_new_tokens={name: cfg.new_tokens(name) for name in benchmark_sets},
                        parallel=parallel, progress=progress)


def fit_and_evaluate(cfg: VqaConfig, probe: MultimodalProbe, features: FeatureCache,
                     alignment: Sequence[VqaSample], instruction: Sequence[VqaSample],
                     benchmark_sets: Mapping[str, Sequence[VqaSample]],
                     scorer: Optional[Scorer] = None, progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """``fit_probe``, then ``answer_benchmarks``, in one process; the stages' logs included.
    ``progress`` (the job's) keeps each stage and each benchmark's answers as parts."""
    parallel, logs = fit_probe(cfg, probe, features, alignment, instruction, progress)
    result = answer_benchmarks(cfg, probe, features, benchmark_sets, scorer, parallel, progress)
    result["training"] = logs
    return result
