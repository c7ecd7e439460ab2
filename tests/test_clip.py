"""CLIP baseline: InfoNCE on hand cases, distributed equivalence, temperature, text tower,
tokenizer, and a tiny model that learns colour-word retrieval."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from webssl_repro.methods.base import PretrainMethod
from webssl_repro.methods.clip import ClipConfig, ClipMethod, clip_loss
from webssl_repro.models.text import TextTransformer, build_tokenizer, load_tokenizer

COLOURS = {
    "red": (1, 0, 0), "green": (0, 0.6, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
    "cyan": (0, 1, 1), "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0),
    "orange": (1, 0.5, 0), "purple": (0.5, 0, 0.5), "pink": (1, 0.7, 0.8), "brown": (0.5, 0.25, 0),
    "gray": (0.5, 0.5, 0.5), "olive": (0.5, 0.5, 0), "navy": (0, 0, 0.4), "teal": (0, 0.5, 0.5),
}
CAPTIONS = [f"a photo of a {name} square" for name in COLOURS]

# img = [[1,0],[0,1]], txt = [[1,0],[1,1]] -> unit txt [[1,0],[c,c]], c = 1/√2; sim = [[1,c],[0,c]]
# rows (image→text):  log(1+e^{s(c-1)}), log(1+e^{-sc});  cols: log(1+e^{-s}), log 2
# loss = ((row0+row1)/2 + (col0+col1)/2) / 2
HAND_IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
HAND_TXT = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
HAND_EXPECTED = {1.0: 0.49115703961126583, 10.0: 0.1865289790544986}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_clip_loss_hand_case(scale):
    c = 1 / math.sqrt(2)
    formula = ((math.log1p(math.exp(scale * (c - 1))) + math.log1p(math.exp(-scale * c))) / 2
               + (math.log1p(math.exp(-scale)) + math.log(2)) / 2) / 2
    assert formula == pytest.approx(HAND_EXPECTED[scale], rel=1e-12)
    assert clip_loss(HAND_IMG, HAND_TXT, scale).item() == pytest.approx(HAND_EXPECTED[scale], rel=1e-6)
    as_tensor = clip_loss(HAND_IMG, HAND_TXT, torch.tensor(scale)).item()
    assert as_tensor == pytest.approx(HAND_EXPECTED[scale], rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss itself stays fp32
        in_autocast = clip_loss(HAND_IMG, HAND_TXT, torch.tensor([scale], dtype=torch.bfloat16)).item()
    assert in_autocast == pytest.approx(HAND_EXPECTED[scale], rel=1e-6)


def test_clip_loss_symmetric_and_scale_invariant_inputs():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert clip_loss(img, txt, 5.0).item() == pytest.approx(clip_loss(txt, img, 5.0).item(), rel=1e-6)
    # embeddings are normalised inside: rescaling rows leaves the loss unchanged
    rescaled = clip_loss(3 * img, 0.1 * txt, 5.0).item()
    assert rescaled == pytest.approx(clip_loss(img, txt, 5.0).item(), rel=1e-6)


def test_perfect_alignment_large_scale_is_near_zero_and_chance_is_log_b():
    eye = torch.eye(4)
    assert clip_loss(eye, eye, 100.0).item() < 1e-6
    same = torch.ones(4, 3)  # all pairs identical: uniform softmax -> log B
    assert clip_loss(same, same, 100.0).item() == pytest.approx(math.log(4), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run as a fresh interpreter per rank (imports only torch + the loss: much faster than spawn).
_RANK_SCRIPT = """
import json, os, torch, torch.distributed as dist
from webssl_repro.methods.clip import clip_loss
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
img, txt = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
n = 8 // world
li = img[rank * n:(rank + 1) * n].clone().requires_grad_()
lt = txt[rank * n:(rank + 1) * n].clone().requires_grad_()
loss = clip_loss(li, lt, 3.0)
loss.backward()
print(json.dumps([loss.item(), li.grad.tolist(), lt.grad.tolist()]))
dist.destroy_process_group()
"""


def test_distributed_local_loss_matches_global_batch():
    """2 gloo ranks × 4 rows: mean of rank losses and DDP-averaged grads equal the 8-row loss."""
    port = _free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=src, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 4, generator=g).requires_grad_()
    txt = torch.randn(8, 4, generator=g).requires_grad_()
    full = clip_loss(img, txt, 3.0)
    full.backward()
    assert results[0][0] != pytest.approx(results[1][0], rel=1e-6)  # ranks see different rows
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    grad_img = torch.tensor(results[0][1] + results[1][1]) / 2  # DDP averages over ranks
    grad_txt = torch.tensor(results[0][2] + results[1][2]) / 2
    assert torch.allclose(grad_img, img.grad, atol=1e-6)
    assert torch.allclose(grad_txt, txt.grad, atol=1e-6)


# ----------------------------------------------------------------------------- tokenizer / text


@pytest.mark.parametrize("kind", ["bpe", "wordlevel"])
def test_tokenizer_build_save_load_roundtrip(tmp_path, kind):
    path = tmp_path / "tok" / "tokenizer.json"
    tok = build_tokenizer(CAPTIONS * 3, vocab_size=120, path=path, kind=kind)
    loaded = load_tokenizer(path)
    assert path.exists() and loaded.vocab_size == tok.vocab_size <= 120
    assert (tok.pad_id, loaded.eot_id) == (0, loaded.vocab_size - 1)  # EOT is the largest id
    ids = loaded(["A photo of a Red square", "teal"], context_length=10)
    assert torch.equal(ids, tok(["A photo of a Red square", "teal"], context_length=10))
    assert ids.shape == (2, 10) and ids[0, 0].item() == loaded.sot_id
    teal = loaded.tokenizer.token_to_id("teal</w>" if kind == "bpe" else "teal")
    assert ids[1].tolist() == [loaded.sot_id, teal, loaded.eot_id] + [0] * 7  # SOT word EOT pad…
    assert loaded.decode(ids[0].tolist()) == "a photo of a red square"
    # web alt-text escapes, single and double, are undone before BPE, as open_clip's basic_clean
    assert torch.equal(loaded(["A photo of a Red&#32;square", "&amp;#116;eal"], context_length=10), ids)
    # truncation keeps EOT in the last slot
    short = loaded(["a photo of a red square"], context_length=4)
    assert short[0].tolist()[-1] == loaded.eot_id and short[0, 0].item() == loaded.sot_id
    # a file cut short, or without CLIP's start/end tokens, is named by its key and path
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match=rf"pretrain.clip.tokenizer {cut}: not a tokenizers JSON file"):
        load_tokenizer(cut)
    with pytest.raises(ValueError, match=rf"pretrain.clip.tokenizer {path}: tokenizer lacks special tokens: \['<s>'"):
        load_tokenizer(path, sot_token="<s>")
    # a file that pads and truncates on its own frames the same ids
    loaded.tokenizer.enable_padding(length=12, pad_id=3)
    loaded.tokenizer.enable_truncation(max_length=2)
    padded = tmp_path / "padded.json"
    loaded.save(padded)
    assert torch.equal(load_tokenizer(padded)(["A photo of a Red square", "teal"], context_length=10), ids)


@pytest.mark.parametrize("kind", ["bpe", "wordlevel"])
def test_tokenizer_ids_identical_across_processes(tmp_path, kind):
    """A rebuilt tokenizer (resume, text-tower evaluation) must give the trained ids: the
    ``tokenizers`` trainers number tokens in per-process hash order, so the build is done here."""
    captions = [f"a photo of a {c} {s}, the {s} in front of the {t}" for c in COLOURS
                for s in ("square", "ring", "star") for t in ("tree", "car")]
    script = ("import sys, json; from webssl_repro.models.text import build_tokenizer\n"
              "caps = json.loads(sys.argv[1])\n"
              f"tok = build_tokenizer(caps, 200, sys.argv[2], kind={kind!r})\n"
              "print(json.dumps(tok(caps, 16).tolist()))")
    outs = [subprocess.run([sys.executable, "-c", script, json.dumps(captions), str(tmp_path / f"t{i}.json")],
                           check=True, capture_output=True, text=True).stdout for i in range(3)]
    assert outs[0] == outs[1] == outs[2]
    files = [(tmp_path / f"t{i}.json").read_text() for i in range(3)]
    assert files[0] == files[1] == files[2]
    tok = load_tokenizer(tmp_path / "t0.json")
    assert torch.equal(torch.tensor(json.loads(outs[0])), tok(captions, 16))
    assert tok.pad_id == 0 and tok.eot_id == tok.vocab_size - 1
    assert int((tok(captions, 16) == tok.tokenizer.token_to_id("<unk>")).sum()) == 0


def test_paper_tokenizer_is_clip_bpe_from_the_hub(tmp_path, monkeypatch):
    """Paper scale names the OpenAI CLIP BPE by hub repo (MetaCLIP's tokenizer); a stand-in
    with CLIP's special tokens and layout (end-of-text the last id, no pad token) shows how
    it is read: [SOT] words [EOT], padded with 0 as open_clip. A name that is neither a file
    nor a reachable repo is refused by its config key."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from webssl_repro.config import load_config

    paper = load_config(Path(__file__).resolve().parents[1] / "config" / "paper.yaml")
    repo = paper["pretrain"]["clip"]["tokenizer"]
    assert repo == "openai/clip-vit-large-patch14"
    vocab = {"a": 0, "red": 1, "cube": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}
    stand_in = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    stand_in.pre_tokenizer = pre_tokenizers.Whitespace()
    stand_in.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    revision = paper["pretrain"]["clip"]["tokenizer_revision"]
    assert revision == "32bd64288804d66eefd0ccbe215aa642df71cc41"  # pinned: every job reads the same BPE
    asked = []
    monkeypatch.setattr(Tokenizer, "from_pretrained",
                        staticmethod(lambda name, revision: asked.append((name, revision)) or stand_in))
    tok = load_tokenizer(repo, revision=revision)
    assert asked == [(repo, revision)] and tok.vocab_size == 5 and (tok.sot_id, tok.eot_id, tok.pad_id) == (3, 4, 0)
    assert tok("a red cube", 7).tolist() == [[3, 0, 1, 2, 4, 0, 0]]
    load_tokenizer(repo)
    assert asked[-1] == (repo, "main")  # unpinned: the repo's newest

    def offline(name, revision):
        raise RuntimeError("no network")

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(offline))
    with pytest.raises(FileNotFoundError, match=r"pretrain.clip.tokenizer 'no/such-repo' at revision abc is neither"):
        load_tokenizer("no/such-repo", revision="abc")
    built = tmp_path / "tokenizer.json"
    stand_in.save(str(built))
    with pytest.raises(ValueError, match=r"tokenizer_revision 'abc' is a commit of a hub repo, but .* is a local file"):
        load_tokenizer(built, revision="abc")
    assert load_tokenizer(tmp_path)("a red cube", 7).tolist() == [[3, 0, 1, 2, 4, 0, 0]]  # a snapshot directory
    with pytest.raises(ValueError, match=rf"pretrain.clip.tokenizer {tmp_path} is a local directory$"):
        load_tokenizer(tmp_path, revision="abc")
    with pytest.raises(FileNotFoundError, match=r"pretrain.clip.tokenizer .*: a directory without a tokenizer.json"):
        load_tokenizer(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_text_tower_pools_eot_and_ignores_padding_after_it():
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=20, context_length=8, width=16, layers=2, heads=2,
                            output_dim=6, eot_token_id=19)
    a = torch.tensor([[1, 5, 7, 19, 0, 0, 0, 0]])
    b = torch.tensor([[1, 5, 7, 19, 3, 4, 11, 2]])  # different tokens after EOT
    c = torch.tensor([[1, 5, 8, 19, 0, 0, 0, 0]])  # different token before EOT
    ya, yb, yc = tower(a), tower(b), tower(c)
    assert ya.shape == (1, 6)
    assert torch.allclose(ya, yb, atol=1e-6)
    assert not torch.allclose(ya, yc, atol=1e-3)
    argmax_tower = TextTransformer(20, 8, 16, 2, 2, 6)  # open_clip rule: EOT = largest id
    argmax_tower.load_state_dict(tower.state_dict())
    assert torch.allclose(argmax_tower(b), yb, atol=1e-6)


def test_text_tower_init_is_open_clips():
    """open_clip's ``init_parameters``: normal weights whose std shrinks with width and depth,
    attention biases at zero (``nn.MultiheadAttention``'s), MLP biases at ``nn.Linear``'s uniform
    ±1/sqrt(fan_in)."""
    torch.manual_seed(0)
    width, layers = 256, 4
    tower = TextTransformer(vocab_size=50, context_length=8, width=width, layers=layers, heads=4)
    blk = tower.blocks[0]
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    assert blk.qkv.weight.std().item() == pytest.approx(width ** -0.5, rel=0.02)
    assert blk.out_proj.weight.std().item() == pytest.approx(proj_std, rel=0.02)
    assert blk.c_fc.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.02)
    assert blk.c_proj.weight.std().item() == pytest.approx(proj_std, rel=0.02)
    assert not blk.qkv.bias.any() and not blk.out_proj.bias.any()
    for lin in (blk.c_fc, blk.c_proj):
        bound = lin.in_features ** -0.5
        assert 0.5 * bound < lin.bias.abs().max().item() <= bound

# ----------------------------------------------------------------------------- method


def tiny_method(tmp_path) -> ClipMethod:
    tok = build_tokenizer(CAPTIONS, vocab_size=64, path=tmp_path / "tok.json", kind="wordlevel")
    torch.manual_seed(0)
    vision = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    cfg = ClipConfig(embed_dim=32, context_length=10, text_width=32, text_layers=1, text_heads=4)
    return ClipMethod(vision, tok, cfg)


def test_temperature_init_and_clamp(tmp_path):
    method = tiny_method(tmp_path)
    scale = method.model.logit_scale
    assert scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.fill_(7.0)  # exp(7) ≈ 1097
    method.after_optimizer_step(0)
    assert scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        scale.fill_(-1.0)
    method.after_optimizer_step(1)
    assert scale.item() == 0.0


def test_param_groups_exclude_gains_biases_temperature(tmp_path):
    method = tiny_method(tmp_path)
    assert isinstance(method, PretrainMethod)
    decay, no_decay = method.param_groups(4e-4, 0.2)
    names = {id(p): n for n, p in method.model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"logit_scale", "vision.cls_token", "vision.norm.weight", "text.ln_final.weight",
            "text.blocks.0.qkv.bias"} <= nd
    assert {"text.text_projection", "visual_projection.weight", "text.token_embedding.weight",
            "vision.blocks.0.attn.qkv.weight", "vision.pos_embed"} <= d
    assert (decay["weight_decay"], no_decay["weight_decay"], no_decay["wd_multiplier"]) == (0.2, 0.0, 0.0)
    assert len(d) + len(nd) == len(names)


def test_config_defaults_and_from_mapping():
    c = ClipConfig()
    assert (c.batch_size, c.lr, c.warmup_iters, c.context_length) == (32768, 4e-4, 2000, 77)
    assert (c.betas, c.eps, c.weight_decay, c.max_logit_scale) == ((0.9, 0.98), 1e-6, 0.2, 100.0)
    assert ClipConfig.from_mapping({"text_layers": 2}).text_layers == 2
    with pytest.raises(ValueError, match="txt_width"):
        ClipConfig.from_mapping({"txt_width": 8})


def colour_batch():
    g = torch.Generator().manual_seed(0)
    rgb = torch.tensor(list(COLOURS.values())).view(16, 3, 1, 1)
    images = rgb.expand(16, 3, 32, 32) + 0.05 * torch.randn(16, 3, 32, 32, generator=g)
    return {"images": (images - 0.5) / 0.25, "captions": CAPTIONS}


def test_tiny_clip_learns_colour_word_retrieval(tmp_path):
    method = tiny_method(tmp_path)
    batch = colour_batch()
    opt = torch.optim.AdamW(method.param_groups(2e-3, 0.2), betas=(0.9, 0.98), eps=1e-6)
    first = None
    for step in range(60):
        out = method.training_step(batch, step)
        first = out["loss"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_optimizer_step(step)
    with torch.no_grad():
        img = method.model.encode_image(batch["images"])
        txt = method.model.encode_text(method.tokenize(CAPTIONS))
    top1 = (img @ txt.T).argmax(dim=1).eq(torch.arange(16)).float().mean().item()
    assert first > 0.9 * math.log(16)  # untrained: no better than chance (log B)
    assert out["loss"].item() < 0.3 * first
    assert top1 >= 0.75  # chance is 1/16


def test_transform_is_metaclips_mild_crop_without_flip():
    """MetaCLIP's training transform: RandomResizedCrop over 90-100 % of the image, no flip,
    OpenAI's normalisation."""
    from PIL import Image

    from webssl_repro.methods.clip import clip_transform

    torch.manual_seed(0)
    red = clip_transform(32)(Image.new("RGB", (64, 48), (255, 0, 0)))
    assert red.shape == (3, 32, 32)
    assert red[0].mean().item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-3)
    assert red[2].mean().item() == pytest.approx(-0.40821073 / 0.27577711, abs=1e-3)
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(48, 64)  # red rises left to right
    image = Image.fromarray(torch.stack([ramp, torch.zeros_like(ramp), torch.zeros_like(ramp)], -1).numpy())
    rows = [clip_transform(32)(image)[0].mean(0) * 0.26862954 + 0.48145466 for _ in range(200)]
    spans = [(r.max() - r.min()).item() for r in rows]
    assert all(r[0] < r[-1] for r in rows)  # never mirrored
    assert min(spans) > 0.8 and sum(spans) / 200 > 0.85  # at least 90 % of the area (aspect 3/4-4/3)
