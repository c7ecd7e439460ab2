"""Diagnostic: can the mini VQA probe's language model answer the mini questions when the scene is *text*?

The image-free half of ``probe_vqa_oracle.py``. Each question of the 16 benchmark analogues comes
with its scene written out as text in front of it: every object's colour, texture, class, facing,
position and depth (nearest first), each sign's colour and word, a chart's or document's strings.
The LM (``config/mini.yaml``'s ``evaluate.vqa`` settings: its size, its stage-2 recipe, the same
``MultimodalProbe`` training and greedy scoring) is fine-tuned on such text-only samples and scored
on fresh scenes, against the same LM given the questions alone (``blind``). Here the answer is in
the LM's own input, so nothing depends on a projector or an encoder. If ``scene`` does not beat
``blind`` on the Average, no encoder can beat its init on the mini VQA probe: the LM cannot use
the facts even when they are spelled out for it. Not a timing benchmark (benchmarks/README.md).

Run: ``python benchmarks/probe_vqa_text.py [--train 128] [--test 50] [--set '{"lm_hidden": 128, "lm_layers": 4}']
[--threads 1] [--encoders scene blind]``.
"""
from __future__ import annotations

import json
import time
from typing import Any

import torch
import yaml

from probe_vqa_controls import CONFIG, merged, parse_args

from webssl_repro.data.evalsets import vqa_draw
from webssl_repro.data.miniweb.world import MiniWebConfig
from webssl_repro.evaluate.vqa.data import FeatureCache, VqaSample
from webssl_repro.evaluate.vqa.lm import build_tokenizer
from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe, evaluate_vqa, train_stage
from webssl_repro.evaluate.vqa.stage import STAGE_KEYS
from webssl_repro.metrics import VQA_BENCHMARKS

#: World seeds of the text scenes: pretraining-range seeds, apart from the corpus (0) and IN-1k (1) ones.
TRAIN_SEED, TEST_SEED = 4242, 4343


def _where(box: list[float]) -> str:
    """The box centre's cell of a 10x10 grid: the questions' left/right pairs lie >= 0.12 apart."""
    return f"x{min(9, int(5 * (box[0] + box[2])))} y{min(9, int(5 * (box[1] + box[3])))}"


def scene_text(spec: dict[str, Any]) -> str:
    """Everything a question may ask about ``spec``, as one line; objects nearest first."""
    parts = []
    for o in sorted(spec["objects"], key=lambda o: o["depth"]):
        texture = "" if o["texture"] == "solid" else o["texture"] + " "
        facing = "" if o["facing"] == "none" else f" facing {o['facing']}"
        parts.append(f"{o['colour']} {texture}{o['class']}{facing} at {_where(o['box'])} depth {o['depth']:.0f}")
    if spec["kind"] == "text_scene":
        parts += [f"{t['bg']} sign {t['string']} at {_where(t['box'])}" for t in spec["texts"]]
    elif spec["kind"] in ("chart", "document"):
        parts.append(" ".join(spec["strings"]))
    return " ; ".join(parts)


def text_samples(seed: int, per_benchmark: int, with_scene: bool) -> dict[str, list[VqaSample]]:
    """``per_benchmark`` text-only samples of each analogue (MME/MMVP pairs kept whole)."""
    cfg, out = MiniWebConfig(size=64), {}
    for k, benchmark in enumerate(VQA_BENCHMARKS):
        samples: list[VqaSample] = []
        index = 0
        while len(samples) < per_benchmark:
            for q, spec in vqa_draw(benchmark, seed + 100 * k, index, cfg):
                question = f"{scene_text(spec)}\n{q['question']}" if with_scene else q["question"]
                meta = {key: v for key, v in q.items() if key not in ("question", "answer")}
                samples.append(VqaSample(None, question, str(q["answer"]), benchmark, meta))
            index += 1
        out[benchmark] = samples
    return out


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], ("scene", "blind"))
    mini = yaml.safe_load(CONFIG.read_text())
    options = merged(mini["evaluate"]["vqa"], json.loads(args.set))
    config = VqaConfig.from_mapping({k: v for k, v in options.items() if k not in STAGE_KEYS})
    none = FeatureCache(["none"], torch.zeros(1, config.tokens, 1))  # text-only: no visual tokens are read
    for name in args.encoders:
        t0 = time.perf_counter()
        train = [s for group in text_samples(TRAIN_SEED, args.train, name == "scene").values() for s in group]
        tests = text_samples(TEST_SEED, args.test, name == "scene")
        tokenizer = build_tokenizer([f"{s.question} {s.answer}" for s in train] + ["USER: ASSISTANT:"])
        probe = build_probe(config, 1, tokenizer)
        log = train_stage(probe, train, none, 2, config.stage2, max_length=config.max_length, seed=config.seed + 2)
        result = evaluate_vqa(probe, tests, features=none, batch_size=config.eval_batch_size,
                              max_new_tokens=config.max_new_tokens)
        scores = {k: round(float(v), 2) for k, v in {**result["benchmarks"], **result["categories"]}.items()}
        print(json.dumps({"encoder": name, "seconds": round(time.perf_counter() - t0, 1), "train": len(train),
                          "final_loss": round(float(log["losses"][-1]), 3), **scores}), flush=True)


if __name__ == "__main__":
    main()
