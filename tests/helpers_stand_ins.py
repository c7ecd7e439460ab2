"""Paper-scale models as tiny local stand-ins (nothing is downloaded): a random-init Llama
with a tokenizer that knows Llama-3's chat special tokens, a tiny ViT encoder file, and the
helpers the checkpoint-import tests share (weights moved off their init, state equality, images)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def build_tiny_llama(out: Path, texts: list[str]) -> Path:
    """A random-init Llama and a word-level tokenizer with Llama-3's chat special tokens, saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from webssl_repro.evaluate.vqa.lm import build_tokenizer

    tok = build_tokenizer([*texts, "user assistant"])
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def save_tiny_encoder(path: Path, depth: int = 1) -> Path:
    from safetensors.torch import save_file

    from webssl_repro.models.vit import Arch, build_encoder

    meta = {"method": "dino", "arch": {"width": 48, "depth": depth, "heads": 3, "patch": 8}, "img_size": 32}
    torch.manual_seed(0)
    enc = build_encoder(Arch(**meta["arch"]), "dino", img_size=32)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path),
              metadata={"encoder": json.dumps(meta)})
    return path


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere, in place: norm gains 1 ± 0.1, every other weight ± 0.1 (LayerScale
    1e-5, zero biases and unit gains would hide a mis-mapped weight); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same weights bit for bit (their keys must be the same)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def fixed_images(size: int, n: int = 2) -> torch.Tensor:
    """``n`` fixed random RGB images of ``size`` px (seed 1)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
