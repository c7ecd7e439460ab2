"""What the VQA probe eats: visual tokens from a frozen encoder, and chat-formatted text.

Visual tokens follow Cambrian's ``DinoVisionTower``: the last layer's patch tokens after the
final norm (prefix tokens dropped), bilinearly resized to a fixed square grid, so every
encoder hands the LM the same token count (576 at paper scale). They are computed once per
run into a cache, because the two LM stages never touch the encoder. Text is rendered with
a chat format and labelled LLaVA-style: only answer tokens carry a loss.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from webssl_repro.evaluate.features import encoder_fingerprint

IGNORE = -100
IMAGE = "<image>"


@dataclass
class VqaSample:
    """One conversation about one image (``image_id`` None: text-only instruction data).

    ``meta`` carries what a scorer needs beyond the answer (choices, pair_id, subtask);
    ``turns`` holds further (question, answer) rounds of multi-turn instruction data.
    """

    image_id: Optional[str]
    question: str
    answer: str
    benchmark: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    turns: tuple[tuple[str, str], ...] = ()

    def reference(self) -> dict[str, Any]:
        return {**self.meta, "answer": self.answer}


@dataclass(frozen=True)
class ChatFormat:
    """A conversation template split into the pieces label masking needs.

    ``prefix`` opens the conversation and may hold the ``<image>`` slot; otherwise the slot
    goes before the first question (LLaVA moves the image to the front of turn one).
    ``stop`` is the token that ends an answer and stops greedy decoding.
    """

    prefix: str
    user: str
    answer: str
    stop: str

    def pieces(self, sample: VqaSample, with_answer: bool = True) -> list[tuple[str, str]]:
        """(kind, text) pieces, kind ∈ {prompt, image, answer}, in conversation order."""
        has_image = sample.image_id is not None
        prefix = self.prefix if has_image else self.prefix.replace(IMAGE + "\n", "").replace(IMAGE, "")
        first_q = sample.question.replace(IMAGE, "").strip()
        if has_image and IMAGE not in prefix:
            first_q = IMAGE + "\n" + first_q
        turns = [(first_q, sample.answer), *sample.turns]
        text = prefix
        out: list[tuple[str, str]] = []
        for k, (q, a) in enumerate(turns):
            out += _split_image(text + self.user.format(question=q))
            text = ""
            if k == len(turns) - 1 and not with_answer:
                break
            out.append(("answer", self.answer.format(answer=a)))
        return out


def _split_image(text: str) -> list[tuple[str, str]]:
    before, sep, after = text.partition(IMAGE)
    out = [("prompt", before)] if before else []
    if sep:
        out.append(("image", ""))
        if after:
            out.append(("prompt", after))
    return out


MINI_CHAT = ChatFormat(prefix="<bos><image>\n", user="USER: {question}\nASSISTANT:", answer=" {answer}<eos>\n",
                       stop="<eos>")
# Llama-3's own chat format (its special tokens and header layout), with no system message:
# the default, as neither the paper nor Cambrian settles the probe's format. Cambrian's scripts
# pass ``--version llama_v3``, which in its train_fsdp.py only sets the pad token and leaves the
# Vicuna-v1 template in place for training, while its eval scripts (``--conv_mode llama_3``)
# prompt with ``conv_llama_3``: a "You are Cambrian" system turn and headers without a newline
# (``CAMBRIAN_LLAMA3_CHAT``). Training and testing share whichever is chosen here.
LLAMA3_CHAT = ChatFormat(
    prefix="<|begin_of_text|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    answer="{answer}<|eot_id|>", stop="<|eot_id|>")
#: ``conv_llama_3`` of Cambrian's conversation.py, its system prompt verbatim (whitespace included)
CAMBRIAN_SYSTEM = ("You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n    As a "
                   "multimodal AI, you have the ability to process and analyze images. Whenever an image is "
                   "present in the conversation, very carefully examine it and consider its content when "
                   "formulating your response.\n    You should give concise responses to very simple "
                   "questions, but provide thorough responses to more complex and open-ended questions. ")
CAMBRIAN_LLAMA3_CHAT = ChatFormat(
    prefix=f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{CAMBRIAN_SYSTEM}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    answer="{answer}<|eot_id|>", stop="<|eot_id|>")
CHAT_FORMATS = {"mini": MINI_CHAT, "llama_3": LLAMA3_CHAT, "cambrian_llama_3": CAMBRIAN_LLAMA3_CHAT}


def pad_id(tokenizer) -> int:
    """Llama-3 ships without a pad token; any id works because pads are masked out."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class Encoded:
    input_ids: list[int]
    image_mask: list[bool]
    labels: list[int]


def encode(tokenizer, fmt: ChatFormat, sample: VqaSample, n_tokens: int, with_answer: bool = True,
           max_length: Optional[int] = None) -> Encoded:
    """Token ids with ``n_tokens`` image slots; labels are the ids on answers, ``IGNORE`` elsewhere."""
    ids: list[int] = []
    img: list[bool] = []
    labels: list[int] = []
    filler = pad_id(tokenizer)
    for kind, text in fmt.pieces(sample, with_answer):
        if kind == "image":
            ids += [filler] * n_tokens
            img += [True] * n_tokens
            labels += [IGNORE] * n_tokens
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        img += [False] * len(piece)
        labels += piece if kind == "answer" else [IGNORE] * len(piece)
    if max_length is not None and len(ids) > max_length:
        if any(img[max_length:]):
            raise ValueError(f"encode: max_length={max_length} would cut the image tokens")
        ids, img, labels = ids[:max_length], img[:max_length], labels[:max_length]
    return Encoded(ids, img, labels)


def collate(batch: Sequence[Encoded], pad: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest; left padding for generation so every prompt ends at the last column."""
    if side not in ("left", "right"):
        raise ValueError(f"collate: side must be 'left' or 'right', got {side!r}")
    length = max(len(e.input_ids) for e in batch)
    out = {k: [] for k in ("input_ids", "attention_mask", "image_mask", "labels")}
    for e in batch:
        n = length - len(e.input_ids)
        rows = {"input_ids": (e.input_ids, pad), "attention_mask": ([1] * len(e.input_ids), 0),
                "image_mask": (e.image_mask, False), "labels": (e.labels, IGNORE)}
        for k, (values, fill) in rows.items():
            out[k].append([fill] * n + list(values) if side == "left" else list(values) + [fill] * n)
    t = {k: torch.tensor(v) for k, v in out.items()}
    t["image_mask"] = t["image_mask"].bool()
    return t


def samples_from_items(items: Iterable[Mapping[str, Any]], prefix: str = "") -> list[VqaSample]:
    """Mini-web eval-set items (``webssl_repro.data.evalsets.vqa_items``) as samples, their image
    ids under ``prefix/`` (a split's, where several splits share one image cache)."""
    drop = {"image", "question", "answer", "image_id", "benchmark"}
    head = f"{prefix}/" if prefix else ""
    return [VqaSample(f"{head}{it['image_id']}", str(it["question"]), str(it["answer"]), str(it.get("benchmark", "")),
                      {k: v for k, v in it.items() if k not in drop}) for it in items]


# ---------------------------------------------------------------- visual tokens


def resize_token_grid(patches: torch.Tensor, grid: tuple[int, int], n_tokens: int) -> torch.Tensor:
    """(B, h·w, D) patch tokens → (B, n_tokens, D) on a √n×√n grid, bilinear, align_corners=False."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is not a square grid")
    B, P, D = patches.shape
    h, w = grid
    if h * w != P:
        raise ValueError(f"{P} patch tokens do not fill a {h}x{w} grid")
    if (h, w) == (side, side):
        return patches
    maps = patches.transpose(1, 2).reshape(B, D, h, w)
    maps = F.interpolate(maps.float(), size=(side, side), mode="bilinear", align_corners=False).to(patches.dtype)
    return maps.flatten(2).transpose(1, 2)


def _patch_tokens(encoder, images: torch.Tensor, num_prefix_tokens: Optional[int]) -> torch.Tensor:
    out = encoder.forward_features(images) if hasattr(encoder, "forward_features") else encoder(images)
    if isinstance(out, Mapping) and "x_norm_patchtokens" in out:  # DINOv2-style dict: prefix already gone
        return out["x_norm_patchtokens"]
    if hasattr(out, "last_hidden_state"):  # HF Dinov2Model / ViTModel (post final norm)
        out = out.last_hidden_state
    n_prefix = num_prefix_tokens if num_prefix_tokens is not None else int(getattr(encoder, "num_prefix_tokens", 1))
    return out[:, n_prefix:]


@torch.no_grad()
def encoder_tokens(encoder, images: torch.Tensor, n_tokens: int,
                   num_prefix_tokens: Optional[int] = None) -> torch.Tensor:
    """Frozen encoder → last-layer normed patch tokens (CLS/registers dropped) → fixed grid."""
    patches = _patch_tokens(encoder, images, num_prefix_tokens)
    H, W = images.shape[-2:]
    P = patches.shape[1]
    h = max(1, round(math.sqrt(P * H / W)))
    return resize_token_grid(patches, (h, P // h), n_tokens)


class FeatureCache(Mapping[str, torch.Tensor]):
    """Visual tokens by image id; ``batch`` stacks them (zeros for text-only samples)."""

    def __init__(self, ids: Sequence[str], features: torch.Tensor, fingerprint: Optional[str] = None):
        if len(ids) != features.shape[0]:
            raise ValueError(f"FeatureCache: {len(ids)} ids for {features.shape[0]} feature rows")
        self.ids = list(ids)
        self.features = features
        self.fingerprint = fingerprint  # of the encoder that made them (``encoder_fingerprint``)
        self.index = {k: i for i, k in enumerate(self.ids)}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.features[self.index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, image_ids: Sequence[Optional[str]]) -> torch.Tensor:
        rows = [self.index[k] if k is not None else -1 for k in image_ids]
        out = self.features[torch.tensor([max(r, 0) for r in rows])]
        missing = torch.tensor([r < 0 for r in rows])
        return out.masked_fill(missing[:, None, None], 0.0) if missing.any() else out

    def save(self, path: str | Path) -> None:
        from webssl_repro.files import atomic_write

        if str(path).endswith(".safetensors"):
            from safetensors.torch import save

            data = save({"features": self.features.contiguous()},
                        metadata={"ids": json.dumps(self.ids), "fingerprint": self.fingerprint or ""})
            atomic_write(path, lambda f: f.write(data))
        else:
            atomic_write(path, lambda f: torch.save({"ids": self.ids, "features": self.features,
                                                     "fingerprint": self.fingerprint}, f))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureCache":
        path = str(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
                return cls(json.loads(meta["ids"]), f.get_tensor("features"), meta.get("fingerprint") or None)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return cls(blob["ids"], blob["features"], blob.get("fingerprint"))


def extract_features(encoder, image_iter: Iterable[tuple[Sequence[str], torch.Tensor]], n_tokens: int,
                     path: Optional[str | Path] = None, dtype: torch.dtype = torch.float32,
                     num_prefix_tokens: Optional[int] = None, inputs: str = "") -> FeatureCache:
    """Run the frozen encoder once over (ids, images) batches; reuse ``path`` if it already holds
    them: from this very encoder, at ``n_tokens``, of the same ``inputs`` (a digest of the images
    the batches hold, ``stage.images_digest``: ids alone would not tell an eval set regenerated at
    another size). Else they are recomputed and the file replaced."""
    import hashlib

    fingerprint = hashlib.sha1(f"{encoder_fingerprint(encoder)} {n_tokens} {dtype} {inputs}".encode()).hexdigest()
    if path is not None and os.path.exists(path):
        cache = FeatureCache.load(path)
        if cache.fingerprint == fingerprint:
            return cache
    was_training = encoder.training
    encoder.eval()
    ids: list[str] = []
    chunks: list[torch.Tensor] = []
    try:
        for batch_ids, images in image_iter:
            ids += [str(i) for i in batch_ids]
            chunks.append(encoder_tokens(encoder, images, n_tokens, num_prefix_tokens).to(dtype).cpu())
    finally:
        encoder.train(was_training)
    cache = FeatureCache(ids, torch.cat(chunks) if chunks else torch.zeros(0, n_tokens, 0, dtype=dtype), fingerprint)
    if path is not None:
        cache.save(path)
    return cache
