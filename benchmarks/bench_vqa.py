"""Benchmark: one mini VQA evaluation of one encoder, end to end, and where its time goes.

Sized like the mini config (``config/mini.yaml`` evaluate.vqa, read at run time): the
mini "7b" tower (width 128, depth 4, patch 8) at the "224" resolution (32 px → 4×4 patches,
bilinearly resized to 36 tokens = the paper's 256 → 576 ratio), the stage-1 alignment captions
(evaluate.vqa.alignment_samples, 1,024 unless set), 16 benchmarks × data.evalsets.vqa.train
instruction samples for stage 2 and 16 × data.evalsets.vqa.test questions for the greedy evaluation. Text and images are synthetic
(random words/pixels): this measures cost, not accuracy. Target: ≤ 60 s on 2 cores.
Run: ``python benchmarks/bench_vqa.py [--threads N] [--scale F]``.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from webssl_repro.evaluate.vqa.data import VqaSample, extract_features
from webssl_repro.evaluate.vqa.lm import build_tokenizer
from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe, fit_and_evaluate
from webssl_repro.evaluate.vqa.stage import STAGE_KEYS
from webssl_repro.metrics import VQA_BENCHMARKS
from webssl_repro.models.vit import Arch, build_encoder


def synthetic(n_align: int, n_train: int, n_test: int, seed: int = 0):
    """Caption and question/answer samples with mini-web-like lengths (MC questions carry 4 options)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    words = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    align = [VqaSample(f"a{i}", "Describe the image briefly.", words(rng.randint(8, 16))) for i in range(n_align)]

    def qa(split: str, bench: str, i: int) -> VqaSample:
        if i % 2:
            question = words(rng.randint(6, 12)) + "\n" + "\n".join(f"{L}. {words(2)}" for L in "ABCD")
            return VqaSample(f"{bench}-{split}-{i // 2}", question + "\nAnswer with the option's letter.",
                             rng.choice("ABCD"), bench)
        return VqaSample(f"{bench}-{split}-{i // 2}", words(rng.randint(6, 12)) + "?", words(rng.randint(1, 2)), bench)

    train = [qa("train", b, i) for b in VQA_BENCHMARKS for i in range(n_train)]
    test = {b: [qa("test", b, i) for i in range(n_test)] for b in VQA_BENCHMARKS}
    texts = [s.question + " " + s.answer for s in align + train] + ["USER: ASSISTANT: A B C D"]
    return align, train, test, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; a 0.4M-param LM gains little from 2 and suffers from contention")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every sample count")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import yaml

    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "mini.yaml").read_text())
    cfg = VqaConfig.from_mapping({k: v for k, v in section["evaluate"]["vqa"].items() if k not in STAGE_KEYS})
    n = lambda k: max(2, int(k * args.scale))  # noqa: E731
    times: dict[str, float] = {}

    t = time.perf_counter()
    counts = section["data"]["evalsets"]["vqa"]
    align, train, test, texts = synthetic(n(int(section["evaluate"]["vqa"].get("alignment_samples", 1024))),
                                          n(counts["train"]), n(counts["test"]))
    tok = build_tokenizer(texts)
    probe = build_probe(cfg, 128, tok)
    encoder = build_encoder(Arch(width=128, depth=4, heads=8, patch=8), "dino", img_size=32)
    times["setup (data, tokenizer, models)"] = time.perf_counter() - t

    image_ids = sorted({s.image_id for s in align + train} | {s.image_id for v in test.values() for s in v})
    batches = ((image_ids[k:k + 256], torch.rand(len(image_ids[k:k + 256]), 3, 32, 32))
               for k in range(0, len(image_ids), 256))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        features = extract_features(encoder, batches, cfg.tokens, Path(tmp) / "features.safetensors")
    times[f"feature extraction ({len(image_ids)} images)"] = time.perf_counter() - t

    t = time.perf_counter()
    result = fit_and_evaluate(cfg, probe, features, align, train, test)
    elapsed = time.perf_counter() - t
    logs = {log["stage"]: log for log in result["training"]}
    for stage, n_samples in ((1, len(align)), (2, len(train))):
        times[f"stage {stage} ({n_samples} samples, {logs[stage]['steps']} steps)"] = logs[stage]["seconds"]
    n_test = sum(len(v) for v in test.values())
    times[f"generation + scoring ({n_test} questions)"] = elapsed - logs[1]["seconds"] - logs[2]["seconds"]

    total = sum(times.values())
    print(f"mini VQA probe: LM hidden {cfg.lm_hidden} x {cfg.lm_layers} layers, vocab {len(tok)}, "
          f"{sum(p.numel() for p in probe.parameters()) / 1e6:.2f}M params, {cfg.tokens} visual tokens, "
          f"{args.threads} thread(s)")
    for name, sec in times.items():
        print(f"  {name:<48s} {sec:7.2f} s  {100 * sec / total:5.1f}%")
    print(f"  {'total':<48s} {total:7.2f} s")
    for stage, log in logs.items():
        ms = 1000 * log["seconds"] / log["steps"]
        print(f"  stage {stage}: {ms:.0f} ms/step, final loss {log['final_loss']:.2f}")
    print(f"  Average (random data, ~chance): {result['categories']['Average']:.2f}")


if __name__ == "__main__":
    main()
