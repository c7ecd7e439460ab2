"""The Cambrian VQA probe: label masking, generation, the two training stages and evaluation
(its inputs: test_vqa_data.py)."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from webssl_repro.evaluate.vqa.data import IGNORE, MINI_CHAT, FeatureCache, VqaSample, encode
from webssl_repro.evaluate.vqa.lm import build_tiny_lm, build_tokenizer
from webssl_repro.evaluate.vqa.probe import (MultimodalProbe, StageConfig, VqaConfig, backward_global_batch,
                                             build_probe, build_projector, evaluate_vqa, fit_and_evaluate, train_stage)
from webssl_repro.metrics import VQA_BENCHMARKS

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
TOKENS, VIS_DIM = 4, 12


def _world(n: int, seed: int, text_only: int = 0) -> tuple[list[VqaSample], FeatureCache]:
    """Images whose visual tokens encode a colour and a shape; two question types about them.
    The first ``text_only`` samples carry no image (as text-only instruction rows do)."""
    g = torch.Generator().manual_seed(seed)
    ids, feats, samples = [], [], []
    for i in range(n):
        c, s = int(torch.randint(len(COLOURS), (1,), generator=g)), int(torch.randint(len(SHAPES), (1,), generator=g))
        f = 0.1 * torch.randn(TOKENS, VIS_DIM, generator=g)
        f[:, c] += 1.0
        f[:, len(COLOURS) + s] += 1.0
        ids.append(f"img{seed}-{i}")
        feats.append(f)
        image = None if i < text_only else ids[-1]
        if i % 2:
            samples.append(VqaSample(image, "what colour is the object?", COLOURS[c], "gqa"))
        else:
            samples.append(VqaSample(image, "which shape is shown in the picture?", SHAPES[s], "gqa"))
    return samples, FeatureCache(ids, torch.stack(feats))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["USER: ASSISTANT: what colour is the object? which shape is shown in the picture? is it",
             " ".join(COLOURS + SHAPES)]
    return build_tokenizer(texts)


@contextlib.contextmanager
def answered_batches() -> Iterator[list[tuple[int, int]]]:
    """Each ``MultimodalProbe.answer_batch`` call meanwhile, as (questions, max_new_tokens)."""
    calls, original = [], MultimodalProbe.answer_batch

    def recording(self, samples, features, max_new_tokens=32, **kwargs):
        calls.append((len(samples), max_new_tokens))
        return original(self, samples, features, max_new_tokens, **kwargs)

    MultimodalProbe.answer_batch = recording
    try:
        yield calls
    finally:
        MultimodalProbe.answer_batch = original


def _probe(tokenizer, hidden=64, layers=2, seed=0) -> MultimodalProbe:
    lm = build_tiny_lm(len(tokenizer), hidden=hidden, layers=layers, heads=4, seed=seed,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return MultimodalProbe(lm, tokenizer, VIS_DIM, tokens=TOKENS, chat=MINI_CHAT)


def test_answer_only_label_masking(tokenizer):
    s = VqaSample("x", "what colour is the object?", "red blue", turns=(("which shape is shown?", "circle"),))
    e = encode(tokenizer, MINI_CHAT, s, n_tokens=TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    answer_positions = [i for i, lab in enumerate(e.labels) if lab != IGNORE]
    assert all(e.labels[i] == e.input_ids[i] for i in answer_positions) and len(e.labels) == len(e.input_ids)
    assert [e.labels[i] for i in answer_positions] == ids(["red", "blue", "<eos>", "circle", "<eos>"])
    assert sum(e.image_mask) == TOKENS and all(e.labels[i] == IGNORE for i, m in enumerate(e.image_mask) if m)
    assert e.input_ids[0] == tokenizer.bos_token_id and e.image_mask[1:1 + TOKENS] == [True] * TOKENS
    # The rendered text is exactly the tokenizer's own chat template.
    msgs = [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer},
            {"role": "user", "content": "which shape is shown?"}, {"role": "assistant", "content": "circle"}]
    rendered = "".join(t if k != "image" else "<image>" for k, t in MINI_CHAT.pieces(s))
    assert rendered == tokenizer.apply_chat_template(msgs, tokenize=False)
    # The probe's loss is the CE of exactly those positions.
    probe = _probe(tokenizer, hidden=32, layers=1)
    visual, t = probe.batch([s], FeatureCache(["x"], torch.randn(1, TOKENS, VIS_DIM)), with_answer=True)
    out = probe(visual, **t)
    full = probe(visual, **{k: v for k, v in t.items() if k != "labels"})["logits"][0]  # every position
    logp = full.log_softmax(-1)
    manual = -torch.stack([logp[i - 1, e.labels[i]] for i in answer_positions]).mean()
    assert int(out["n_answer"]) == 5 and torch.allclose(out["loss"], manual, atol=1e-5)
    # the training forward runs the LM head on the answer positions alone, in their order
    assert out["answer_logits"].shape == (5, full.shape[-1]) and "logits" not in out
    torch.testing.assert_close(out["answer_logits"], full[[i - 1 for i in answer_positions]], atol=1e-5, rtol=1e-5)


def test_cambrian_chat_format_renders_its_eval_scripts_prompt():
    """``chat_format: cambrian_llama_3`` is conv_llama_3 of Cambrian's conversation.py as its
    eval scripts render it (system turn, headers without a newline, the image first); training
    appends the answer and <|eot_id|>, the only pieces labelled."""
    from webssl_repro.evaluate.vqa.data import CAMBRIAN_SYSTEM, CHAT_FORMATS

    fmt = CHAT_FORMATS["cambrian_llama_3"]
    s = VqaSample("x", "What is shown?", "A cat")
    render = lambda with_answer: "".join(t if k != "image" else "<image>" for k, t in fmt.pieces(s, with_answer))
    head = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{CAMBRIAN_SYSTEM}<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|><image>\nWhat is shown?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>")
    assert render(False) == head and render(True) == head + "A cat<|eot_id|>"
    assert [t for k, t in fmt.pieces(s) if k == "answer"] == ["A cat<|eot_id|>"]
    assert CAMBRIAN_SYSTEM.startswith("You are Cambrian, a highly intelligent") and "\n    As a" in CAMBRIAN_SYSTEM


def test_batched_greedy_equals_one_by_one(tokenizer):
    probe = _probe(tokenizer, hidden=32, layers=2, seed=3).double()
    samples, feats = _world(5, seed=7)
    samples[1] = VqaSample(samples[1].image_id, "what colour is the object? is it red or blue or green?", "x")
    samples[3] = VqaSample(None, "is it", "x")  # text-only: no image slot at all
    feats = FeatureCache(feats.ids, feats.features.double())
    steps: list[torch.Tensor] = []
    hook = probe.lm.register_forward_hook(lambda m, args, out: steps.append(out.logits[:, -1].detach()))
    batched = probe.answer(samples, feats, batch_size=5, max_new_tokens=6)
    batched_steps, steps[:] = list(steps), []
    single = []
    for i, s in enumerate(samples):
        single.append(probe.answer([s], feats, batch_size=1, max_new_tokens=6)[0])
        # Every decoding step's logits match, not just the argmax (padding must be invisible).
        for k, step in enumerate(steps[:len(single[-1].split())]):
            assert torch.allclose(batched_steps[k][i], step[0], atol=1e-9), (i, k)
        steps.clear()
    hook.remove()
    assert batched == single and sum(len(p.split()) for p in batched) >= 5
    # Left padding leaves the last-position logits unchanged too.
    visual, t = probe.batch(samples, feats, with_answer=False)
    last = probe(visual, t["input_ids"], t["attention_mask"], t["image_mask"])["logits"][:, -1]
    for i, s in enumerate(samples):
        v1, t1 = probe.batch([s], feats, with_answer=False)
        ref = probe(v1, t1["input_ids"], t1["attention_mask"], t1["image_mask"])["logits"][0, -1]
        assert torch.allclose(last[i], ref, atol=1e-9)


def test_greedy_answers_are_transformers_generate(tokenizer):
    """The probe's own decoding loop (a KV cache fed one token a step, positions counted past the
    left padding) answers as ``generate(do_sample=False)`` does from the same embeddings, up to the
    end token: on LMs whose random weights are large enough to vary the tokens and end some answers
    early, with an image-less question in the batch."""
    answers = []
    for seed in range(4):
        probe = _probe(tokenizer, hidden=32, layers=2, seed=seed).double().eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in probe.lm.parameters():
                if p.dim() == 2:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        samples, feats = _world(5, seed=7 + seed)
        samples[3] = VqaSample(None, "is it", "x")
        feats = FeatureCache(feats.ids, feats.features.double())
        visual, t = probe.batch(samples, feats, with_answer=False)
        ours = probe.generate(visual, t["input_ids"], t["attention_mask"], t["image_mask"], 8)
        with torch.no_grad():
            emb = probe.embed(visual, t["input_ids"], t["image_mask"])
            generated = probe.lm.generate(inputs_embeds=emb, attention_mask=t["attention_mask"], max_new_tokens=8,
                                          do_sample=False, eos_token_id=probe.stop_ids,
                                          pad_token_id=tokenizer.pad_token_id).tolist()
        ends = [[i for i, x in enumerate(row) if x in probe.stop_ids][:1] or [len(row)] for row in generated]
        assert ours == [row[:end] for row, (end,) in zip(generated, ends)], seed
        answers += ours
    assert sum(len(a) < 8 for a in answers) >= 3 and len({tuple(a) for a in answers}) == len(answers)


def test_stage1_trains_projector_only(tokenizer):
    probe = _probe(tokenizer, hidden=32, layers=1)
    samples, feats = _world(16, seed=1)
    lm_before = {k: v.clone() for k, v in probe.lm.state_dict().items()}
    proj_before = {k: v.clone() for k, v in probe.projector.state_dict().items()}
    quick = dict(lr=1e-2, batch_size=8, warmup_ratio=0.0)
    log = train_stage(probe, samples, feats, 1, StageConfig(micro_batch_size=4, max_steps=3, **quick))
    assert log["steps"] == 3 and len(log["losses"]) == 3
    assert all(torch.equal(v, lm_before[k]) for k, v in probe.lm.state_dict().items())
    assert all(not torch.equal(v, proj_before[k]) for k, v in probe.projector.state_dict().items())
    train_stage(probe, samples, feats, 2, StageConfig(micro_batch_size=8, max_steps=1, **quick))
    assert any(not torch.equal(v, lm_before[k]) for k, v in probe.lm.state_dict().items())


def test_stage1_can_train_a_from_scratch_lm(tokenizer):
    """``train_lm: true`` (mini option): stage 1 also trains the LM, which has no language to protect."""
    probe = _probe(tokenizer, hidden=32, layers=1)
    samples, feats = _world(16, seed=1)
    lm_before = {k: v.clone() for k, v in probe.lm.state_dict().items()}
    train_stage(probe, samples, feats, 1, StageConfig(lr=1e-2, batch_size=8, micro_batch_size=8, max_steps=1,
                                                      warmup_ratio=0.0, train_lm=True))
    assert any(not torch.equal(v, lm_before[k]) for k, v in probe.lm.state_dict().items())


def test_bf16_precision_autocasts_the_forward_and_keeps_fp32_weights(tokenizer, monkeypatch):
    """Stage 2 of the paper moves an 8B LM by lr 4e-5: in bf16 weights most such steps round
    away (bf16(0.02) + 4e-5 == 0.02), so the weights and AdamW state stay fp32 and only the
    forward autocasts to bf16 (on CUDA; forced here on the CPU)."""
    from webssl_repro.evaluate.vqa import probe as probe_mod

    assert torch.tensor(0.02, dtype=torch.bfloat16) + 4e-5 == torch.tensor(0.02, dtype=torch.bfloat16)
    assert probe_mod.autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    assert probe_mod.autocast_dtype("bf16", torch.device("cpu")) is None
    assert probe_mod.autocast_dtype("fp32", torch.device("cuda")) is None
    assert VqaConfig().precision == "bf16"
    with pytest.raises(ValueError, match="evaluate.vqa.precision: 'fp16' is not one of"):
        VqaConfig.from_mapping({"precision": "fp16"})
    with pytest.raises(ValueError, match="evaluate.vqa.tokens: 35 is not a square number"):  # before any data loads
        VqaConfig.from_mapping({"tokens": 35})
    probe = _probe(tokenizer, hidden=32, layers=1)
    probe.precision = "bf16"
    monkeypatch.setattr(probe_mod, "autocast_dtype", lambda precision, device: torch.bfloat16)
    samples, feats = _world(8, seed=1)
    visual, t = probe.batch(samples[:2], feats, with_answer=True)
    assert probe(visual, **t)["answer_logits"].dtype == torch.bfloat16  # the forward ran in bf16
    before = {k: v.clone() for k, v in probe.lm.state_dict().items()}
    train_stage(probe, samples, feats, 2, StageConfig(lr=4e-5, batch_size=8, micro_batch_size=8, max_steps=1,
                                                      warmup_ratio=0.0))
    weights = [(k, v) for k, v in probe.lm.state_dict().items() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for _, v in weights)
    moved = [(v != before[k]).float().mean().item() for k, v in weights if k.endswith("proj.weight")]
    assert moved and min(moved) > 0.95  # an Adam step of ~lr reaches nearly every fp32 weight
    dtypes = []
    lm_forward = probe.lm.forward

    @functools.wraps(lm_forward)  # keeps the signature the decoder inspects
    def recording(*args, **kwargs):
        out = lm_forward(*args, **kwargs)
        dtypes.append(out.logits.dtype)
        return out

    monkeypatch.setattr(probe.lm, "forward", recording)
    assert probe.answer(samples[:2], feats, batch_size=2, max_new_tokens=2)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # every decoding step ran under the autocast


def test_gradient_accumulation_is_split_invariant(tokenizer):
    probe = _probe(tokenizer, hidden=32, layers=1).double()
    samples, feats = _world(6, seed=2)
    samples[0] = VqaSample(samples[0].image_id, samples[0].question, "red green blue purple")  # uneven lengths
    feats = FeatureCache(feats.ids, feats.features.double())
    grads = []
    for split in ([samples], [samples[:1], samples[1:4], samples[4:]]):
        probe.zero_grad()
        loss = backward_global_batch(probe, split, feats)
        grads.append((loss, torch.cat([p.grad.flatten() for p in probe.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def test_answers_end_at_the_lms_own_end_tokens_too(tokenizer, tmp_path):
    """HF's generate stops at every id of the LM's generation_config.eos_token_id (Llama-3-
    Instruct: <|eot_id|> and <|end_of_text|>); so does the probe's greedy decoding, on every
    rank: a rank that builds the LM on the meta device reads the same generation config."""
    from webssl_repro.evaluate.vqa.lm import load_lm

    samples, feats = _world(2, seed=1)

    def answered(end_tokens) -> list[list[int]]:
        lm = build_tiny_lm(len(tokenizer), hidden=32, layers=1, heads=4, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            lm.model.norm.weight.zero_()  # every logit 0: the argmax is token 0, every step
        lm.generation_config.eos_token_id = end_tokens
        probe = MultimodalProbe(lm, tokenizer, VIS_DIM, tokens=TOKENS, chat=MINI_CHAT)
        visual, t = probe.batch(samples, feats, with_answer=False)
        return probe.generate(visual, t["input_ids"], t["attention_mask"], t["image_mask"], 3)

    assert answered(tokenizer.eos_token_id) == [[0, 0, 0]] * 2
    assert answered([tokenizer.eos_token_id, 0]) == [[], []]
    lm = build_tiny_lm(len(tokenizer), hidden=32, layers=1, heads=4, eos_token_id=tokenizer.eos_token_id)
    lm.generation_config.eos_token_id = [0, tokenizer.eos_token_id]
    lm.save_pretrained(tmp_path / "lm")
    assert lm.config.eos_token_id == tokenizer.eos_token_id  # the config names one end token
    for weights in (True, False):
        assert load_lm(tmp_path / "lm", weights=weights).generation_config.eos_token_id == [0, tokenizer.eos_token_id]


def test_cambrian_device_batches_weigh_each_device_mean_alike(tokenizer):
    """per_device_batch: the loss is the mean over device batches of each one's mean answer-token
    CE (Cambrian's trainer), whatever the micro-batches; the global-token mean differs from it."""
    from webssl_repro.evaluate.vqa.batching import CambrianBatches

    probe = _probe(tokenizer, hidden=32, layers=1).double()
    samples, feats = _world(4, seed=2)
    samples[2] = VqaSample(samples[2].image_id, samples[2].question, "red green blue purple red green")
    feats = FeatureCache(feats.ids, feats.features.double())
    batches = CambrianBatches(probe, samples, StageConfig(lr=1.0, batch_size=4, per_device_batch=2), None)
    weights = batches.weights(range(4))
    assert batches.tokens == {0: 2, 1: 2, 2: 7, 3: 2}  # answer words + <eos>
    assert weights == pytest.approx([1 / 8, 1 / 8, 1 / 18, 1 / 18])  # 1 / (2 devices x their tokens)
    device_means = []
    with torch.no_grad():
        for k in (0, 2):
            visual, t = probe.batch(samples[k:k + 2], feats, with_answer=True)
            device_means.append(float(probe(visual, **t)["loss"]))
    grads = []
    for split in ([samples], [samples[:1], samples[1:3], samples[3:]]):
        probe.zero_grad()
        cuts = [0, *np.cumsum([len(m) for m in split])]
        loss = backward_global_batch(probe, split, feats, weights=[weights[a:b] for a, b in zip(cuts, cuts[1:])])
        grads.append(torch.cat([p.grad.flatten() for p in probe.parameters()]))
        assert loss == pytest.approx(sum(device_means) / 2, rel=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    probe.zero_grad()
    assert backward_global_batch(probe, [samples], feats) != pytest.approx(sum(device_means) / 2, rel=1e-3)


def test_cambrian_order_groups_by_modality_and_balances_devices():
    """Each epoch: every sample once; each full global batch one modality (the leftover mixed, last);
    its device batches dealt longest-first to the lightest, so their word totals stay close."""
    from webssl_repro.evaluate.vqa.batching import modality_length, modality_length_order

    g = torch.Generator().manual_seed(0)
    lengths = [int(v) for v in torch.randint(3, 60, (53,), generator=g)]
    lengths = [v if i % 3 else -v for i, v in enumerate(lengths)]  # every third sample text-only
    order = modality_length_order(lengths, per_device=2, world=4, generator=torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(53))
    full = (sum(v > 0 for v in lengths) // 8 + sum(v < 0 for v in lengths) // 8) * 8
    for start in range(0, full, 8):
        mb = order[start:start + 8]
        assert len({lengths[i] > 0 for i in mb}) == 1, mb
        totals = [sum(abs(lengths[i]) for i in mb[k:k + 2]) for k in range(0, 8, 2)]
        assert max(totals) - min(totals) <= max(abs(lengths[i]) for i in mb), totals
    assert order == modality_length_order(lengths, 2, 4, torch.Generator().manual_seed(1))
    assert order != modality_length_order(lengths, 2, 4, torch.Generator().manual_seed(2))
    assert modality_length(VqaSample(None, "two words", "three more words")) == -5
    assert modality_length(VqaSample("x", "two words", "one", turns=(("a b", "c"),))) == 6


def test_only_stage_2_groups_its_batches_by_modality_and_length(tokenizer):
    """Cambrian's fine-tuning script sets group_by_modality_length, its adapter pre-training does
    not (transformers' random sampler): at the paper's per_device_batch 8, stage 1 draws a plain
    random order and still weighs each device batch's mean alike."""
    from webssl_repro.evaluate.vqa.batching import CambrianBatches, modality_length, modality_length_order
    from webssl_repro.evaluate.vqa.config import VqaConfig

    cfg = VqaConfig.from_mapping({"stage1": {"per_device_batch": 2, "batch_size": 8},
                                  "stage2": {"per_device_batch": 2, "batch_size": 8}})
    assert (cfg.stage1.group_by_modality_length, cfg.stage2.group_by_modality_length) == (False, True)
    probe = _probe(tokenizer, hidden=32, layers=1)
    samples, _ = _world(24, seed=4, text_only=5)
    lengths = [modality_length(s) for s in samples]
    stage1, stage2 = (CambrianBatches(probe, samples, stage, None) for stage in (cfg.stage1, cfg.stage2))
    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    assert stage1.epoch(seeded()) == torch.randperm(24, generator=seeded()).tolist()
    assert stage2.epoch(seeded()) == modality_length_order(lengths, 2, 4, seeded()) != stage1.epoch(seeded())
    assert stage1.weights(range(8)) == stage2.weights(range(8))  # the loss is Cambrian's either way


def test_a_stage_with_cambrian_batches_trains_and_resumes_alike(tokenizer, tmp_path):
    """train_stage with per_device_batch: the loss falls, and a stage stopped after its 5th step
    and resumed ends with the same weights as one run through (the grouped order is saved)."""
    from helpers_progress import StopAfter
    from webssl_repro.evaluate.progress import EvalProgress
    from webssl_repro.train import Preempted

    samples, feats = _world(48, seed=5, text_only=6)
    cfg = StageConfig(lr=3e-3, batch_size=8, micro_batch_size=4, epochs=2, per_device_batch=2, train_lm=True)
    whole = _probe(tokenizer, hidden=32, layers=1)
    out = train_stage(whole, samples, feats, 2, cfg, seed=3)
    assert out["steps"] == 12 and out["losses"][-1] < out["losses"][0]
    with pytest.raises(Preempted):
        with EvalProgress(tmp_path, checkpoint_every_min=0, deadline=StopAfter(5)) as progress:
            train_stage(_probe(tokenizer, hidden=32, layers=1), samples, feats, 2, cfg, seed=3, progress=progress)
    resumed = _probe(tokenizer, hidden=32, layers=1)
    again = train_stage(resumed, samples, feats, 2, cfg, seed=3, progress=EvalProgress(tmp_path, checkpoint_every_min=0))
    assert again["losses"] == out["losses"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _exact(benchmark, preds, refs):
    return 100.0 * sum(p == r["answer"] for p, r in zip(preds, refs)) / len(refs)


def test_end_to_end_answers_from_visual_tokens(tokenizer):
    """After a short stage 2 the probe reads colour/shape from the tokens; random tokens give ~chance."""
    cfg = VqaConfig.from_mapping({
        "language_model": "tiny", "tokens": TOKENS, "chat_format": "mini", "lm_hidden": 64, "lm_layers": 2,
        "lm_heads": 4, "max_length": 64, "max_new_tokens": 4, "eval_batch_size": 32,
        "stage1": {"lr": 1e-3, "batch_size": 64, "micro_batch_size": 64, "max_steps": 4},
        "stage2": {"lr": 3e-3, "batch_size": 32, "micro_batch_size": 32, "epochs": 6, "warmup_ratio": 0.05}})
    probe = build_probe(cfg, VIS_DIM, tokenizer)
    train, train_feats = _world(384, seed=11)
    test, test_feats = _world(60, seed=12)
    feats = FeatureCache(train_feats.ids + test_feats.ids, torch.cat([train_feats.features, test_feats.features]))
    good = fit_and_evaluate(cfg, probe, feats, train[:64], train, {"gqa": test}, _exact)
    stage1, stage2 = good["training"]
    assert (stage1["steps"], stage2["steps"]) == (4, 72) and stage2["final_loss"] < 0.5
    noise = FeatureCache(test_feats.ids, torch.randn_like(test_feats.features))
    bad = evaluate_vqa(probe, {"gqa": test}, _exact, features=noise, max_new_tokens=4)
    assert good["benchmarks"]["gqa"] >= 85.0, good
    assert bad["benchmarks"]["gqa"] <= 55.0 and good["benchmarks"]["gqa"] - bad["benchmarks"]["gqa"] >= 35.0
    assert good["categories"] is None  # a single benchmark has no paper average


def test_evaluate_vqa_keys_and_category_math(tokenizer):
    probe = _probe(tokenizer, hidden=32, layers=1)
    samples, feats = _world(2, seed=5)
    values = {b: float(10 + i) for i, b in enumerate(VQA_BENCHMARKS)}
    values["mme"] = 1500.0
    seen = {}

    def scorer(benchmark, preds, refs):
        seen[benchmark] = (len(preds), [r["answer"] for r in refs])
        return values[benchmark]

    out = evaluate_vqa(probe, {b: samples for b in VQA_BENCHMARKS}, scorer, features=feats, max_new_tokens=2)
    assert set(out) == {"benchmarks", "categories", "standard_errors"} and out["benchmarks"] == values
    assert seen["gqa"] == (2, [s.answer for s in samples])
    cats = out["categories"]
    assert cats["General"] == pytest.approx((1500 / 20 + 11 + 12 + 13) / 4)  # 27.75
    assert cats["Knowledge"] == pytest.approx(15.5) and cats["OCR & Chart"] == pytest.approx(19.5)
    assert cats["Vision-Centric"] == pytest.approx(23.5)
    assert cats["Average"] == pytest.approx((27.75 + 15.5 + 19.5 + 23.5) / 4)
    # over 2 questions each (MME's 2 rows without pair ids: 2 images), e.g. Knowledge's 14..17 %
    knowledge = sum(p * (100 - p) / 2 for p in (14.0, 15.0, 16.0, 17.0)) ** 0.5 / 4
    assert out["standard_errors"]["Knowledge"] == pytest.approx(knowledge)


def mini_vqa_options() -> dict:
    """config/mini.yaml's evaluate.vqa without the stage's own keys (what run_vqa passes on)."""
    import yaml

    from webssl_repro.evaluate.vqa.stage import STAGE_KEYS

    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "mini.yaml").read_text())
    return {k: v for k, v in section["evaluate"]["vqa"].items() if k not in STAGE_KEYS}


def test_config_defaults_and_unknown_keys():
    cfg = VqaConfig.from_mapping({"language_model": "meta-llama/Meta-Llama-3-8B-Instruct", "tokens": 576})
    assert (cfg.stage1.lr, cfg.stage2.lr, cfg.stage2.batch_size, cfg.stage2.weight_decay) == (1e-3, 4e-5, 512, 0.0)
    assert VqaConfig.from_mapping({"stage1": {"lr": 1e-5}}).stage1.warmup_ratio == 0.06
    mini = VqaConfig.from_mapping(mini_vqa_options())
    assert (mini.tokens, mini.lm_hidden, mini.stage2.batch_size, mini.stage1.train_lm) == (36, 64, 16, True)
    with pytest.raises(KeyError, match="toknes"):
        VqaConfig.from_mapping({"toknes": 576})
    with pytest.raises(KeyError, match="stage2.*lr_max"):
        VqaConfig.from_mapping({"stage2": {"lr_max": 1.0}})
    proj = build_projector("mlp2x_gelu", 12, 32)
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear"] and proj[2].in_features == 32


def test_answer_lengths_are_cambrians_per_benchmark(tokenizer):
    """Cambrian's eval scripts: 512 new tokens, 128 for GQA / ChartQA / DocVQA, 32 for MME;
    a config's own limits go over those, and ``max_new_tokens`` caps them all (mini: 8)."""
    cfg = VqaConfig()
    assert [cfg.new_tokens(b) for b in ("mathvista", "gqa", "docvqa", "mme")] == [512, 128, 128, 32]
    longer = VqaConfig.from_mapping({"max_new_tokens": 1024, "max_new_tokens_by_benchmark": {"mathvista": 1024}})
    assert [longer.new_tokens(b) for b in ("mathvista", "mmmu", "gqa")] == [1024, 1024, 128]
    assert VqaConfig.from_mapping(mini_vqa_options()).new_tokens("gqa") == 8
    with pytest.raises(KeyError, match="max_new_tokens_by_benchmark.*'gqa2'"):
        VqaConfig.from_mapping({"max_new_tokens_by_benchmark": {"gqa2": 4}})

    tiny = VqaConfig.from_mapping({
        "language_model": "tiny", "tokens": TOKENS, "chat_format": "mini", "lm_hidden": 32, "lm_layers": 1,
        "lm_heads": 4, "max_length": 64, "max_new_tokens": 3, "max_new_tokens_by_benchmark": {"mme": 1},
        "eval_batch_size": 2, "stage1": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4},
        "stage2": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4}})
    probe = build_probe(tiny, VIS_DIM, tokenizer)
    samples, feats = _world(4, seed=5)
    with answered_batches() as calls:
        fit_and_evaluate(tiny, probe, feats, samples, samples, {"gqa": samples[:3], "mme": samples[:1]}, _exact)
    assert [n for _, n in calls] == [3, 3, 1]  # gqa's two batches, then mme's one


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    """``evaluate.vqa.gradient_checkpointing`` recomputes each decoder layer in the backward: the
    gradients are those of the plain backward (float64, so they agree to rounding)."""
    from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe

    samples, feats = _world(4, seed=2)
    feats = FeatureCache(feats.ids, feats.features.double())
    grads = []
    for on in (False, True):
        cfg = VqaConfig.from_mapping({"language_model": "tiny", "lm_hidden": 32, "lm_layers": 2, "tokens": TOKENS,
                                      "chat_format": "mini", "gradient_checkpointing": on})
        probe = build_probe(cfg, VIS_DIM, tokenizer).double().train()
        assert all(layer.gradient_checkpointing == on for layer in probe.lm.model.layers)
        visual, t = probe.batch(samples, feats, with_answer=True)
        probe(visual, **t)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in probe.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
    # a text-only batch through the frozen LM (stage 1) still has nothing to backpropagate
    probe.lm.requires_grad_(False)
    text_only = [VqaSample(None, "is it", "yes")]
    visual, t = probe.batch(text_only, feats, with_answer=True)
    assert not probe(visual, **t)["loss"].requires_grad


def test_the_answer_only_head_is_used_only_where_it_is_the_lms_own(tokenizer):
    """Cohere's logit_scale, Granite's logits_scaling and Gemma's softcap live in the LM's
    forward: for those the loss takes the full logits; both paths agree for a plain head."""
    from webssl_repro.evaluate.vqa.probe import plain_lm_head

    probe = _probe(tokenizer, hidden=32, layers=1).double()
    assert probe.answer_head_only and plain_lm_head(probe.lm)
    samples, feats = _world(3, seed=4)
    visual, t = probe.batch(samples, FeatureCache(feats.ids, feats.features.double()), with_answer=True)
    head_only = probe(visual, **t)
    probe.answer_head_only = False
    full = probe(visual, **t)
    torch.testing.assert_close(full["loss"], head_only["loss"])
    torch.testing.assert_close(full["answer_logits"], head_only["answer_logits"])
    for key, value in (("logit_scale", 0.0625), ("logits_scaling", 8.0), ("final_logit_softcapping", 30.0)):
        setattr(probe.lm.config, key, value)
        assert not plain_lm_head(probe.lm), key
        delattr(probe.lm.config, key)
