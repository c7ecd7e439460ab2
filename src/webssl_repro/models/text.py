"""CLIP text tower and an offline caption tokenizer.

The tower mirrors open_clip / MetaCLIP ``TextTransformer`` (token + learned positional embedding,
pre-LN causal blocks, final LayerNorm, end-of-text pooling, projection, open_clip's init), so the
CLIP baseline differs from Web-SSL's only in what the paper varies: the vision tower and data.

Tokenizers are HuggingFace ``tokenizers`` JSON files: at mini scale one is trained here from the
corpus captions (no download); at paper scale any ``tokenizer.json`` (e.g. the CLIP BPE) loads.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from torch import nn

from webssl_repro.models.layers import run_blocks

__all__ = ["TextTransformer", "CaptionTokenizer", "build_tokenizer", "load_tokenizer",
           "SOT_TOKEN", "EOT_TOKEN", "PAD_TOKEN", "UNK_TOKEN"]

# Same strings as the CLIP BPE so converted open_clip tokenizers load unchanged.
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


class CausalBlock(nn.Module):
    """Pre-LN transformer block; SDPA with ``is_causal`` is the −inf-above-diagonal mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} not divisible by {heads} heads")
        self.heads = heads
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()  # x·σ(1.702x), OpenAI CLIP's
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class TextTransformer(nn.Module):
    """Causal text encoder → (B, output_dim) un-normalised caption embedding.

    Pooling takes the hidden state at the end-of-text token: the first position equal to
    ``eot_token_id`` when given, else ``tokens.argmax(-1)`` (open_clip: EOT has the largest id).
    Padding after EOT cannot influence it because attention is causal.
    """

    def __init__(self, vocab_size: int, context_length: int = 77, width: int = 512,
                 layers: int = 12, heads: int = 8, output_dim: int = 512, mlp_ratio: float = 4.0,
                 eot_token_id: int | None = None, quick_gelu: bool = False) -> None:
        super().__init__()
        self.grad_checkpointing = False  # timm's flag (models.layers.enable_activation_checkpointing)
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.eot_token_id = eot_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """open_clip ``TextTransformer.init_parameters``; residual projections shrink with depth.
        The attention biases start at zero (``nn.MultiheadAttention``'s), the MLP's at ``nn.Linear``'s."""
        w = self.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = w ** -0.5
        proj_std = w ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * w) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.qkv.weight, std=attn_std)
            nn.init.normal_(blk.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.c_proj.weight, std=proj_std)
            for lin in (blk.qkv, blk.out_proj):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.eot_token_id is None:
            return tokens.argmax(dim=-1)
        return (tokens == self.eot_token_id).int().argmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        return pooled @ self.text_projection


class CaptionTokenizer:
    """Fixed-length CLIP-style encoding around a ``tokenizers.Tokenizer``.

    ``[SOT] words… [EOT] pad…``; over-long captions are cut and the last slot is forced back
    to EOT (open_clip ``tokenize``), so pooling always finds an end-of-text token.
    """

    def __init__(self, tokenizer, sot_token: str = SOT_TOKEN, eot_token: str = EOT_TOKEN,
                 pad_token: str = PAD_TOKEN) -> None:
        # A tokenizer.json may switch on padding or truncation of its own (a hub file saved from a
        # batch pipeline): its pads or cut would land inside the SOT ... EOT frame built here.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (sot_token, eot_token)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens: {missing}")
        self.sot_id = ids[sot_token]
        self.eot_id = ids[eot_token]
        pad = tokenizer.token_to_id(pad_token)
        self.pad_id = 0 if pad is None else pad  # open_clip pads with id 0
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        encodings = self.tokenizer.encode_batch([unescape_caption(t) for t in texts], add_special_tokens=False)
        for row, enc in enumerate(encodings):
            ids = [self.sot_id, *enc.ids, self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def unescape_caption(text: str) -> str:
    """``html.unescape`` twice, as open_clip's and MetaCLIP's ``basic_clean`` before BPE: web
    alt-texts carry ``&amp;``, ``&#39;`` and doubly escaped ``&amp;amp;``. Their ``ftfy.fix_text``
    (mojibake) is not applied: it is not a dependency here. Whitespace and case are the
    tokenizer's own normalizer's (CLIP's tokenizer.json collapses whitespace and lower-cases)."""
    return html.unescape(html.unescape(text)) if "&" in text else text


def build_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path,
                    kind: str = "bpe") -> CaptionTokenizer:
    """Train a lower-cased BPE (CLIP-like ``</w>`` word ends) or word-level tokenizer on captions.

    Ids: ``<pad>``=0, ``<unk>``, SOT, the learned vocabulary, then EOT last, so EOT has the
    largest id and open_clip's argmax pooling also holds. The JSON is written to ``path``.

    The vocabulary is learned here, not by ``tokenizers``' BPE trainer: it numbers the alphabet
    in hash-map order, randomised per process, and breaks ties between equally frequent merges by
    those ids, so two builds from the same captions disagree on ids (measured with 0.23; its
    word-level trainer was stable, but both kinds are built here alike). A run that rebuilds its
    tokenizer (resume, evaluation of the text tower) would then feed the trained embedding table
    the wrong rows. Here ties break on the strings: same texts → same tokenizer, in any process.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = [PAD_TOKEN, UNK_TOKEN, SOT_TOKEN]
    if vocab_size <= len(specials) + 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for words")
    if kind not in ("bpe", "wordlevel"):
        raise ValueError(f"unknown tokenizer kind {kind!r} (bpe | wordlevel)")
    normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Whitespace()
    words: Counter[str] = Counter()
    for text in texts:  # as they will be encoded
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(unescape_caption(text))))
    budget = vocab_size - 1  # EOT is added last
    if kind == "bpe":
        vocab, merges = _train_bpe(words, budget, specials, "</w>")
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                   unk_token=UNK_TOKEN, end_of_word_suffix="</w>"))
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        kept = sorted(words, key=lambda w: (-words[w], w))[: budget - len(specials)]
        vocab = specials + kept
        tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(specials)  # already in the vocabulary: marks them special, same ids
    tok.add_special_tokens([EOT_TOKEN])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return CaptionTokenizer(tok)


def _train_bpe(words: Mapping[str, int], vocab_size: int, specials: Sequence[str],
               suffix: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair merges over word counts (Sennrich et al.; ``tokenizers``' BPE with word-end
    ``suffix``): the most frequent adjacent pair is merged until the vocabulary has
    ``vocab_size`` entries or no pair is left; ties go to the smallest pair of strings.

    Returns (vocabulary in id order: specials, sorted alphabet, merge results; merges in order).
    """
    from collections import Counter

    seqs = {w: [*w[:-1], w[-1] + suffix] for w in words if w}
    vocab = list(specials) + sorted({s for seq in seqs.values() for s in seq} - set(specials))
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        if a + b not in known:
            vocab.append(a + b)
            known.add(a + b)
        for seq in seqs.values():
            i = 0
            while i < len(seq) - 1:
                if seq[i] == a and seq[i + 1] == b:
                    seq[i:i + 2] = [a + b]
                i += 1
    return vocab, merges


def load_tokenizer(path: str | Path, sot_token: str = SOT_TOKEN, eot_token: str = EOT_TOKEN,
                   pad_token: str = PAD_TOKEN, revision: str | None = None) -> CaptionTokenizer:
    """A ``tokenizer.json`` file (one built here, or a directory holding one), or a hub repo that
    holds one, at ``revision`` (a commit: every job of a run, and every run, reads the same BPE):
    at paper scale the OpenAI CLIP BPE that MetaCLIP and open_clip use (49,408 tokens,
    ``<|endoftext|>`` last), as ``openai/clip-vit-large-patch14`` ships it."""
    from tokenizers import Tokenizer

    kind, local = "file", Path(path)
    if local.is_dir():  # a hub snapshot
        kind, local = "directory", local / "tokenizer.json"
        if not local.is_file():
            raise FileNotFoundError(f"pretrain.clip.tokenizer {path}: a directory without a tokenizer.json")
    if local.is_file():
        if revision is not None:
            raise ValueError(f"pretrain.clip.tokenizer_revision {revision!r} is a commit of a hub repo, but "
                             f"pretrain.clip.tokenizer {path} is a local {kind}")
        path = local
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own exception type for a malformed file
            raise ValueError(f"pretrain.clip.tokenizer {path}: not a tokenizers JSON file ({err})") from err
    else:
        try:
            tokenizer = Tokenizer.from_pretrained(str(path), revision=revision or "main")
        except Exception as err:  # tokenizers raises its own exception types for a missing repo / no network
            at = f" at revision {revision}" if revision else ""
            raise FileNotFoundError(f"pretrain.clip.tokenizer {str(path)!r}{at} is neither a tokenizer.json file "
                                    f"nor a hub repo with one that could be fetched ({err})") from err
    try:
        return CaptionTokenizer(tokenizer, sot_token, eot_token, pad_token)
    except ValueError as err:
        raise ValueError(f"pretrain.clip.tokenizer {path}: {err}") from None
