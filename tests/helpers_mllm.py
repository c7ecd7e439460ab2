"""A stand-in for the MLLM text filter's model (test_filters.py, test_filter_workers.py)."""
from __future__ import annotations

import re


def tiny_mllm(path, first_token=None, split=False):
    """A random-init Idefics3 (SmolVLM architecture). With ``first_token`` its final norm is zeroed,
    so every logit is 0 and its greedy answer is always that token (id 0); without, its answers
    depend on the image. ``split``: SmolVLM's image splitting, so that images of other aspects
    take other numbers of tokens and a batch of them is padded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, PreTrainedTokenizerFast)

    from webssl_repro.data.filters import PROMPTS

    first = first_token or "yes"
    prompt_words = [w for p in PROMPTS.values() for w in re.sub(r"[?,.]", " ", p).split()]
    words = list(dict.fromkeys([first, "yes" if first == "no" else "no", "[UNK]", "[PAD]", "User", ":", "Assistant",
                                "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
                                *prompt_words]))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                          "<end_of_utterance>", "<global-img>"]})
    template = ("{% for m in messages %}User:{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                "{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    tile = 16 if split else 32  # with splitting: a 32 px image in 16 px tiles, plus the whole at 16 px
    ip = Idefics3ImageProcessor(do_image_splitting=split, size={"longest_edge": 32},
                                max_image_size={"longest_edge": tile})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=1 if split else 4,
                             chat_template=template)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=tile, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1 if first_token else 2, num_attention_heads=2, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    if first_token:
        with torch.no_grad():
            model.model.text_model.norm.weight.zero_()
    proc.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)
