"""Cambrian's batches and loss weighting, for a stage with ``per_device_batch`` set.

Cambrian's trainer (transformers 4.37 under data parallelism, ``group_by_modality_length``, which
its fine-tuning script sets and its adapter pre-training does not: ``StageConfig``) orders each
epoch by modality and length: megabatches of one global batch hold only samples with
an image or only text ones (but for one mixed leftover), and each is split into its devices'
batches of ``per_device_batch`` samples of about equal total length. Each device's loss is the
mean cross-entropy over its own answer tokens, and the devices' losses are averaged, so a short
answer's tokens weigh more where they share a device batch with short answers. Without
``per_device_batch`` the probe averages over all answer tokens of the global batch instead.
The order follows LLaVA's ``get_modality_length_grouped_indices`` (paraphrased): lengths are
whitespace word counts of the conversation, positive with an image, negative without. The
probe's steps are whole global batches, so an epoch's remainder is completed from the next
epoch's order (Cambrian's last batch of an epoch is short instead): one modality per global
batch holds within the first epoch, the paper's only one.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from webssl_repro.evaluate.vqa.config import StageConfig
from webssl_repro.evaluate.vqa.data import IGNORE, VqaSample, encode


def modality_length(sample: VqaSample) -> int:
    """LLaVA's ``modality_lengths``: the conversation's words, negative for a text-only sample."""
    words = sum(len(text.split()) for turn in ((sample.question, sample.answer), *sample.turns) for text in turn)
    words = max(words, 1)  # LLaVA refuses a length of 0: it could not tell the modality
    return words if sample.image_id is not None else -words


def _even_chunks(indices: Sequence[int], lengths: Sequence[int], n_chunks: int) -> list[list[int]]:
    """``indices`` (longest first) dealt to ``n_chunks`` device batches of equal size, each to
    the one of least total length so far; a count that does not divide is dealt round-robin."""
    if len(indices) % n_chunks:
        return [list(indices[i::n_chunks]) for i in range(n_chunks)]
    size = len(indices) // n_chunks
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    totals = [0.0] * n_chunks
    for i in indices:
        k = totals.index(min(totals))
        chunks[k].append(i)
        totals[k] += lengths[i]
        if len(chunks[k]) == size:
            totals[k] = float("inf")
    return chunks


def _length_grouped(lengths: Sequence[int], per_device: int, world: int, generator: torch.Generator) -> list[int]:
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    mega = per_device * world
    out: list[int] = []
    for start in range(0, len(perm), mega):
        batch = sorted(perm[start:start + mega], key=lambda i: lengths[i], reverse=True)
        out += [i for chunk in _even_chunks(batch, lengths, world) for i in chunk]
    return out


def modality_length_order(lengths: Sequence[int], per_device: int, world: int,
                          generator: torch.Generator) -> list[int]:
    """One epoch's sample order: consecutive runs of ``per_device * world`` samples are global
    batches, each the ``world`` device batches of ``per_device`` samples in turn."""
    if any(v == 0 for v in lengths):
        raise ValueError("modality_length_order: a length of 0 has no modality")
    if all(v > 0 for v in lengths) or all(v < 0 for v in lengths):
        return _length_grouped([abs(v) for v in lengths], per_device, world, generator)
    image = [i for i, v in enumerate(lengths) if v > 0]
    text = [i for i, v in enumerate(lengths) if v < 0]
    # LLaVA draws each modality's order from torch's global RNG; one generator for every draw
    # keeps an epoch's order reproducible and a resumed stage's the same
    image_order = [image[i] for i in _length_grouped([lengths[i] for i in image], per_device, world, generator)]
    text_order = [text[i] for i in _length_grouped([-lengths[i] for i in text], per_device, world, generator)]
    mega = per_device * world
    image_mb = [image_order[i:i + mega] for i in range(0, len(image_order), mega)]
    text_mb = [text_order[i:i + mega] for i in range(0, len(text_order), mega)]
    leftover = image_mb.pop() + text_mb.pop()
    megabatches = image_mb + text_mb
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    return [i for mb in [*megabatches, sorted(leftover)] for i in mb]


def device_batch_weights(answer_tokens: Sequence[int], per_device: int) -> list[float]:
    """Per-sample weights of the summed answer-token cross-entropy that give the mean over the
    device batches (consecutive ``per_device`` samples) of each one's mean over its answer
    tokens; a device batch without answer tokens adds nothing and counts as a device."""
    n = len(answer_tokens)
    if n % per_device:
        raise ValueError(f"VQA global batch of {n} samples does not divide into device batches of {per_device} "
                         "(evaluate.vqa.stageN.per_device_batch)")
    devices = n // per_device
    weights = []
    for start in range(0, n, per_device):
        tokens = sum(answer_tokens[start:start + per_device])
        weights += [1.0 / (devices * tokens) if tokens else 0.0] * per_device
    return weights


class CambrianBatches:
    """A stage's batches as Cambrian's trainer forms them: each epoch's order by modality and
    length, and each sample's weight in the mean over device batches. ``probe`` gives the
    tokenizer, chat format and image slots that decide a sample's answer tokens."""

    def __init__(self, probe: Any, samples: Sequence[VqaSample], cfg: StageConfig,
                 max_length: Optional[int]) -> None:
        self.probe, self.samples, self.cfg, self.max_length = probe, samples, cfg, max_length
        self.lengths = [modality_length(s) for s in samples]
        self.tokens: dict[int, int] = {}  # answer tokens per sample, counted once

    def epoch(self, gen: torch.Generator) -> list[int]:
        if not self.cfg.group_by_modality_length:  # transformers' RandomSampler
            return torch.randperm(len(self.samples), generator=gen).tolist()
        return modality_length_order(self.lengths, self.cfg.per_device_batch,
                                     self.cfg.batch_size // self.cfg.per_device_batch, gen)

    def weights(self, idx: Sequence[int]) -> list[float]:
        for i in idx:
            if i not in self.tokens:
                labels = encode(self.probe.tokenizer, self.probe.chat, self.samples[i], self.probe.tokens,
                                True, self.max_length).labels
                self.tokens[i] = sum(label != IGNORE for label in labels[1:])
        return device_batch_weights([self.tokens[i] for i in idx], self.cfg.per_device_batch)
