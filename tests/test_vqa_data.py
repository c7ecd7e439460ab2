"""The VQA probe's inputs: an encoder's visual tokens and their cache, the tokenizer, and the
mini, Cambrian and real-benchmark samples with their scorer references."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from webssl_repro.evaluate.vqa.data import FeatureCache, encoder_tokens, extract_features
from webssl_repro.evaluate.vqa.lm import build_tokenizer
from webssl_repro.metrics import VQA_BENCHMARKS


class FakeEncoder(nn.Module):
    """forward_features returns [prefix tokens ; a fixed 4×4 patch grid] like a timm ViT."""

    def __init__(self, patches: torch.Tensor, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("patches", patches)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        prefix = torch.full((B, self.num_prefix_tokens, self.patches.shape[-1]), 1000.0)
        return torch.cat([prefix, self.patches.expand(B, -1, -1)], 1)


@pytest.mark.parametrize("n_prefix", [1, 5])
def test_token_grid_resize_is_bilinear_and_drops_prefix(n_prefix):
    grid = torch.arange(16.0).reshape(4, 4)
    patches = torch.stack([grid.flatten(), 10 * grid.flatten()], -1)[None]  # (1, 16, 2)
    out = encoder_tokens(FakeEncoder(patches, n_prefix), torch.zeros(3, 3, 32, 32), n_tokens=4)
    # 4×4 → 2×2 with align_corners=False samples at input coordinate 0.5 and 2.5: the mean of each 2×2 block.
    expected = torch.tensor([(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4])
    assert out.shape == (3, 4, 2)
    assert torch.allclose(out[0, :, 0], expected) and torch.allclose(out[2, :, 1], 10 * expected)
    # enlarged, as the paper's 16×16 → 24×24: 2×2 → 4×4 samples at -0.25, 0.25, 0.75, 1.25 (edges
    # clamped), so a row [0, 1] becomes [0, .25, .75, 1] (area or nearest would give [0, 0, 1, 1])
    small = torch.tensor([0.0, 1.0, 2.0, 3.0])[None, :, None]  # grid [[0, 1], [2, 3]]: 2·row + column
    up = encoder_tokens(FakeEncoder(small, n_prefix), torch.zeros(1, 3, 32, 32), n_tokens=16)
    u = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(up[0, :, 0], (2 * u[:, None] + u[None, :]).flatten())
    same = encoder_tokens(FakeEncoder(patches, n_prefix), torch.zeros(1, 3, 32, 32), n_tokens=16)
    assert torch.equal(same[0], patches[0])  # already on the target grid: untouched, prefix gone
    with pytest.raises(ValueError, match="square"):
        encoder_tokens(FakeEncoder(patches), torch.zeros(1, 3, 32, 32), n_tokens=5)


def test_encoder_tokens_on_a_webssl_vit():
    from webssl_repro.models.vit import Arch, build_encoder

    enc = build_encoder(Arch(width=48, depth=1, heads=3, patch=8), "dino", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = enc.forward_features(x)
    assert full.shape == (2, 17, 48)
    assert torch.allclose(encoder_tokens(enc, x, 16), full[:, 1:])
    up = encoder_tokens(enc, x, 36)  # 4×4 → 6×6, the paper's 16×16 → 24×24 ratio
    assert up.shape == (2, 36, 48) and torch.allclose(up.mean(1), full[:, 1:].mean(1), atol=0.05)


def test_feature_cache_written_once(tmp_path):
    enc = FakeEncoder(torch.randn(1, 16, 3))
    path = tmp_path / "feats.safetensors"
    batches = [(["a", "b"], torch.zeros(2, 3, 32, 32)), (["c"], torch.zeros(1, 3, 32, 32))]
    cache = extract_features(enc, batches, 4, path)
    assert path.exists() and list(cache) == ["a", "b", "c"] and cache.features.shape == (3, 4, 3)

    def boom():
        raise AssertionError("the encoder must not run again")
        yield

    again = extract_features(enc, boom(), 4, path)
    assert torch.equal(again["c"], cache["c"])
    assert torch.equal(cache.batch([None, "b"])[0], torch.zeros(4, 3))
    # another encoder in the same work dir recomputes: the cache is not its features
    other = extract_features(FakeEncoder(torch.ones(1, 16, 3)), batches, 4, path)
    assert torch.equal(other["c"], torch.ones(4, 3)) and not torch.equal(other["c"], cache["c"])
    assert FeatureCache.load(path).fingerprint == other.fingerprint != cache.fingerprint
    # the same encoder over other images (the same ids), or at another token count, recomputes
    regenerated = extract_features(enc, batches, 4, path, inputs="eval set at 48 px")
    assert regenerated.fingerprint != cache.fingerprint and torch.equal(regenerated["c"], cache["c"])
    assert extract_features(enc, boom(), 4, path, inputs="eval set at 48 px").fingerprint == regenerated.fingerprint
    assert extract_features(enc, batches, 1, path).features.shape == (3, 1, 3)


def test_images_digest_follows_pixels_ids_size_and_padding():
    import numpy as np
    from PIL import Image

    from webssl_repro.evaluate.vqa.stage import images_digest

    images = {"vqa/1": Image.new("RGB", (8, 8), (10, 20, 30)), "corpus/2": np.zeros((8, 8, 3), np.uint8)}
    mean = (0.485, 0.456, 0.406)
    base = images_digest(images, 32, mean)
    assert images_digest(dict(reversed(images.items())), 32, mean) == base  # order does not matter
    assert images_digest(images, 48, mean) != base
    assert images_digest(images, 32, (0.5, 0.5, 0.5)) != base  # another encoder's padding colour
    assert images_digest({**images, "vqa/1": Image.new("RGB", (8, 8), (10, 20, 31))}, 32, mean) != base
    assert images_digest({**images, "vqa/3": images["vqa/1"]}, 32, mean) != base


def test_tokenizer_round_trips_through_disk(tmp_path):
    from webssl_repro.evaluate.vqa.lm import load_tokenizer

    tok = build_tokenizer(["<bos> what is 3.5 plus 1? B. red <eos>"], tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    ids = again("what is 3.5 plus 1? B.", add_special_tokens=False)["input_ids"]
    assert ids == tok("what is 3.5 plus 1? B.", add_special_tokens=False)["input_ids"] and len(ids) == 7
    assert again.decode(ids) == "what is 3.5 plus 1 ? B." and again.chat_template == tok.chat_template
    # 4 special tokens + 8 words: special strings in the texts did not get a second id.
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id, len(again)) == (0, 1, 2, 12)


def test_mini_eval_items_become_samples_with_scorer_references():
    from webssl_repro.evaluate.vqa.data import samples_from_items

    items = [{"id": "cvbench2d-test-000000", "benchmark": "cvbench2d", "image_id": "s7", "image": object(),
              "question": "How many circles?\nA. 1\nB. 2", "answer": "B", "choices": ["1", "2"], "subtask": "count"}]
    (s,) = samples_from_items(items)
    assert (s.image_id, s.benchmark, s.answer) == ("s7", "cvbench2d", "B")
    assert s.reference() == {"id": "cvbench2d-test-000000", "answer": "B", "choices": ["1", "2"], "subtask": "count"}


def test_cambrian_loader_excludes_laion(tmp_path):
    from webssl_repro.evaluate.vqa.real import cambrian_samples

    rows = [
        {"id": "1", "image": "coco/train2017/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]},
        {"id": "2", "image": "laion/00001/2.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]},
        {"id": "3", "image": "sam/3.jpg", "source": "LAION-GPT4V", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "y"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    path = tmp_path / "cambrian.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = list(cambrian_samples(path, image_root="/data"))
    assert [s.meta["id"] for s in out] == ["1", "4"]
    assert out[0].image_id == "/data/coco/train2017/1.jpg" and out[0].question == "What is this?"
    assert out[0].turns == (("Colour?", "Grey."),) and out[1].image_id is None
    assert len(list(cambrian_samples(path, laion_markers=()))) == 4
    excluded = [0]  # a copy whose LAION subset sits in an unmarked folder names it
    kept = list(cambrian_samples(path, laion_markers=("laion", "COCO/"), excluded=excluded))
    assert [s.meta["id"] for s in kept] == ["4"] and excluded == [3]


def test_online_features_match_the_cache_path():
    from webssl_repro.evaluate.vqa.real import EncoderFeatures

    enc = FakeEncoder(torch.randn(1, 16, 3))
    online = EncoderFeatures(enc, load=lambda path: path, transform=lambda _: torch.zeros(3, 32, 32), tokens=4)
    out = online.batch(["x.jpg", None])
    assert out.shape == (2, 4, 3) and torch.equal(out[1], torch.zeros(4, 3))
    assert torch.allclose(out[0], encoder_tokens(enc, torch.zeros(1, 3, 32, 32), 4)[0])


def test_real_benchmark_adapters_with_local_stand_ins():
    datasets = pytest.importorskip("datasets")
    from webssl_repro.evaluate.vqa import real
    from webssl_repro.evaluate.vqa.real import BENCHMARKS, load_benchmark
    from webssl_repro.evaluate.vqa.scorers import score

    assert set(BENCHMARKS) == set(VQA_BENCHMARKS)
    mme = datasets.Dataset.from_list([
        {"question_id": "a.jpg", "question": "Is there a dog? Please answer yes or no.", "answer": "Yes",
         "category": "existence", "image": "IMG-A"},
        {"question_id": "a.jpg", "question": "Is there a cat? Please answer yes or no.", "answer": "No",
         "category": "existence", "image": "IMG-A"},
        {"question_id": "b.jpg", "question": "Is 2+2=4?", "answer": "Yes", "category": "numerical_calculation",
         "image": "IMG-B"}])
    samples, image = load_benchmark("mme", dataset=mme)
    assert len(samples) == 2 and image(samples[1].image_id) == "IMG-A"  # cognition subtask dropped
    refs = [s.reference() for s in samples]
    assert samples[0].meta["pair_id"] == samples[1].meta["pair_id"] == "a.jpg"
    assert score("mme", ["Yes", "No"], refs) == 2000.0 and score("mme", ["Yes", "Yes"], refs) == 500.0
    cv = datasets.Dataset.from_list([
        {"prompt": "Which is closer?\n(A) box\n(B) cup", "choices": ["box", "cup"], "answer": "(B)",
         "source": "Omni3D", "task": "Depth", "image": "I"}])
    (s,), _ = load_benchmark("cvbench3d", dataset=cv)
    assert s.answer == "B" and score("cvbench3d", ["(B)"], [s.reference()]) == 100.0
    gqa = datasets.Dataset.from_list([{"question": "What is on the table?", "answer": "cup", "imageId": "n2"}])
    gqa_images = datasets.Dataset.from_list([{"id": "n1", "image": "P1"}, {"id": "n2", "image": "P2"}])
    (s,), image = load_benchmark("gqa", dataset=gqa, images=gqa_images)
    assert image(s.image_id) == "P2" and s.question.endswith("single word or phrase.") and s.answer == "cup"
    ai2d = datasets.Dataset.from_list([{"question": "Which eats grass?", "options": ["fox", "deer"], "answer": "1",
                                        "image": "I"}])
    (s,), _ = load_benchmark("ai2d", dataset=ai2d)
    assert s.answer == "B" and s.question == "Which eats grass?\nA. fox\nB. deer\n" + real.MC_PROMPT
    # Cambrian's prompts and ground truths: MathVista's choice as its letter, TextVQA's OCR tokens,
    # MMBench's " Options:" and its circular groups (question + image + source)
    mv = datasets.Dataset.from_list([
        {"query": "Hint: ...\nWhich is larger?\nChoices:\n(A) 3\n(B) 5", "question": "Which is larger?",
         "question_type": "multi_choice", "choices": ["3", "5"], "answer": "5", "answer_type": "text",
         "decoded_image": "I"},
        {"query": "What is 2+3?", "question": "What is 2+3?", "question_type": "free_form", "choices": None,
         "answer": "5", "answer_type": "integer", "decoded_image": "I"}])
    (mc, free), _ = load_benchmark("mathvista", dataset=mv)
    assert (mc.answer, free.answer) == ("B", "5") and mc.question.endswith(real.MATHVISTA_MC_PROMPT)
    assert score("mathvista", ["B", "5.1"], [mc.reference(), free.reference()]) == 100.0
    tv = datasets.Dataset.from_list([{"question": "What shop?", "answers": ["bakery"] * 10, "ocr_tokens": ["BAKERY", "OPEN"],
                                      "image": "I"}])
    (s,), _ = load_benchmark("textvqa", dataset=tv)
    assert s.question == "What shop?\nReference OCR tokens: BAKERY, OPEN\n" + real.SHORT_PROMPT
    rows = [{"question": "Colour?", "hint": "nan", "A": a, "B": b, "C": None, "D": None, "answer": ans,
             "source": "src", "image": "I"} for a, b, ans in (("red", "blue", "A"), ("blue", "red", "B"))]
    shifted, _ = load_benchmark("mmbench", dataset=datasets.Dataset.from_list(rows))
    assert shifted[0].question == "Colour? Options:\nA. red\nB. blue\n" + real.MC_PROMPT
    assert shifted[0].meta["circular_id"] == shifted[1].meta["circular_id"]
    assert score("mmbench", ["A", "A"], [x.reference() for x in shifted]) == 0.0  # one shift wrong: 0 of 1


def test_a_benchmark_limit_keeps_whole_groups():
    """MMBench scores a question's circular shifts together, MMVP a pair: capped at N samples,
    a benchmark keeps every row of the groups it took, wherever the split holds them; a group cut
    to one row would be scored as plain accuracy. Ungrouped benchmarks stop at N."""
    datasets = pytest.importorskip("datasets")
    from webssl_repro.evaluate.vqa.real import load_benchmark
    from webssl_repro.evaluate.vqa.scorers import score

    # the dev split lists each question's shifts apart: q1, q2, then q1 and q2 shifted
    rows = [{"question": q, "hint": None, "A": a, "B": b, "C": None, "D": None, "answer": ans, "source": "s",
             "image": q} for a, b, ans in (("red", "blue", "A"), ("blue", "red", "B")) for q in ("Colour?", "Shape?")]
    capped, _ = load_benchmark("mmbench", dataset=datasets.Dataset.from_list(rows), limit=1)
    assert [s.image_id for s in capped] == ["mmbench/0", "mmbench/2"]
    assert score("mmbench", ["A", "A"], [s.reference() for s in capped]) == 0.0  # one shift wrong: 0 of 1
    mmvp = datasets.Dataset.from_list([{"Index": k, "Question": "Open?", "Options": "(a) Yes (b) No",
                                        "Correct Answer": "(a)", "image": "I"} for k in range(1, 7)])
    assert [s.meta["pair_id"] for s in load_benchmark("mmvp", dataset=mmvp, limit=3)[0]] == [0, 0, 1, 1]
    seed = datasets.Dataset.from_list([{"question": "What?", "answer": "A", "choice_a": "a", "choice_b": "b",
                                        "choice_c": "c", "choice_d": "d", "image": frames} for frames in
                                       (["I"], ["F1", "F2", "F3"], ["J"])])  # no data_type: a video has frames
    assert [s.image_id for s in load_benchmark("seed", dataset=seed)[0]] == ["seed/0", "seed/2"]
    ai2d = datasets.Dataset.from_list([{"question": "Which?", "options": ["a", "b"], "answer": "1", "image": "I"}] * 3)
    assert len(load_benchmark("ai2d", dataset=ai2d, limit=2)[0]) == 2


def test_control_encoders_hand_the_probe_pixels_or_nothing():
    """The VQA probe's controls (evaluate.vqa.controls): each patch's raw pixels as its token, or
    zeros; both through the probe's own token path (CLS dropped, grid resized)."""
    from webssl_repro.evaluate.vqa.controls import control_encoder
    from webssl_repro.evaluate.vqa.data import encoder_tokens

    images = torch.rand(2, 3, 16, 16)
    pixels, meta = control_encoder("pixels", 16, 8)
    assert meta == {"img_size": 16, "patch": 8, "depth": 0} and pixels.embed_dim == 192
    tokens = encoder_tokens(pixels, images, 4)
    assert tokens.shape == (2, 4, 192)
    assert torch.equal(tokens[0, 1], images[0, :, :8, 8:].reshape(-1))  # token 1 = the top-right patch
    blind, _ = control_encoder("blind", 16, 8)
    assert torch.count_nonzero(encoder_tokens(blind, images, 4)) == 0
    with pytest.raises(ValueError, match="unknown VQA control 'noise'"):
        control_encoder("noise", 16, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        control_encoder("pixels", 20, 8)
