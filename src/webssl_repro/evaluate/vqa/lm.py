"""The probe's language model and tokenizer, at mini and paper scale behind one interface.

Mini: a word-level tokenizer built offline from the instruction texts plus a randomly
initialised ``LlamaForCausalLM`` trained from scratch, so the VQA stage runs on a laptop
with the same ``transformers`` calls the paper-scale Llama-3-8B-Instruct goes through.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

# The mini chat template: "<bos><image>\nUSER: {q}\nASSISTANT: {a}<eos>";
# ``webssl_repro.evaluate.vqa.data.MINI_CHAT`` renders the same strings (tested).
MINI_CHAT_TEMPLATE = (
    "{{ bos_token }}<image>\n"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }}\nASSISTANT:"
    "{% else %} {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(texts: Iterable[str], path: Optional[str | Path] = None, min_frequency: int = 1):
    """A whitespace word-level tokenizer over ``texts``, as a ``PreTrainedTokenizerFast``.

    Whitespace splitting (not punctuation splitting) keeps answers such as ``3.5`` or ``B``
    single tokens, so greedy decoding returns them verbatim for the scorers; ``?``/``,``
    are split off so question words share ids with answer words.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[?,;!]"), behavior="isolated"),
    ])
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency)
    # Special-token strings inside the texts would be counted as words too and get a second id.
    specials = (*SPECIAL_TOKENS, "<image>")
    tok.train_from_iterator([_strip(t, specials) for t in texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="right")
    fast.chat_template = MINI_CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def _strip(text: str, specials: tuple[str, ...]) -> str:
    for sp in specials:
        text = text.replace(sp, " ")
    return text


def _pinned(location: str, revision: str | None) -> dict[str, str]:
    from webssl_repro.files import pinned_revision

    return pinned_revision(revision, location, "evaluate.vqa.language_model_revision", "evaluate.vqa.language_model")


def load_tokenizer(path_or_id: str | Path, revision: str | None = None):
    """A tokenizer saved by ``build_tokenizer`` or a hub id/path (Llama-3 at paper scale), at
    ``revision`` for a hub id."""
    from transformers import AutoTokenizer

    from webssl_repro.files import hub_access, model_location

    location = model_location(path_or_id, "evaluate.vqa.language_model")
    with hub_access("evaluate.vqa.language_model", location):
        return AutoTokenizer.from_pretrained(location, **_pinned(location, revision))


def build_tiny_lm(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                  intermediate: Optional[int] = None, max_positions: int = 256, *,
                  bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0, seed: int = 0):
    """A randomly initialised Llama decoder (RoPE, SwiGLU, RMSNorm) — Llama-3's family in miniature."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def load_lm(path_or_id: str | Path, dtype: str = "float32", *, weights: bool = True, revision: str | None = None):
    """The paper's LM (``meta-llama/Meta-Llama-3-8B-Instruct``) by hub id or local path, in fp32:
    the weights AdamW updates (a bf16 weight of 0.02 does not move by a 4e-5 step); the forward
    autocasts to bf16 (``VqaConfig.precision``). Without ``weights``, the same modules from its
    config on the meta device: an FSDP2 rank that receives its shards from rank 0 reads nothing
    (eight fp32 copies of an 8B LM would take 256 GB of a node's memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from webssl_repro.files import hub_access, model_location

    path_or_id = model_location(path_or_id, "evaluate.vqa.language_model")
    pinned = _pinned(path_or_id, revision)
    with hub_access("evaluate.vqa.language_model", path_or_id):
        if not weights:
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path_or_id), **pinned),
                                                      dtype=getattr(torch, dtype))
            lm.generation_config = _generation_config(path_or_id, lm.generation_config, **pinned)
            return lm
        return AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=getattr(torch, dtype), **pinned)


def _generation_config(path_or_id: str | Path, fallback: Any, **pinned: str) -> Any:
    """The LM's own generation_config.json, as ``from_pretrained`` reads it (its end tokens:
    Llama-3-Instruct's config.json names one, its generation config two), so that every rank
    stops answering where rank 0 does; the config's where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path_or_id), **pinned)
    except OSError:
        return fallback


def lm_hidden_size(lm) -> int:
    return int(lm.get_input_embeddings().embedding_dim)
