"""The ``vqa`` stage for one run: frozen encoder → cached visual tokens → two-stage probe → 16 scores.

Stage-1 (alignment) data are the pretraining corpus' image-caption pairs, as Cambrian-
Alignment is separate from the benchmarks; stage-2 (instruction) data are the train
splits of the 16 benchmark analogues; scores come from their test splits. The encoder
runs once over every image (``FeatureCache`` in the run's work dir); the LM stages only
read the cache. Paper scale takes the same path with ``language_model`` a Llama-3 path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from webssl_repro.evaluate.classic import images_tensor
from webssl_repro.evaluate.vqa.data import VqaSample, extract_features
from webssl_repro.metrics import VQA_BENCHMARKS


def _vqa_split(manifest_path: str | Path, split: str) -> dict[str, list[dict[str, Any]]]:
    from webssl_repro.data.evalsets import load_evalset

    manifest = json.loads(Path(manifest_path).read_text())
    files = manifest["splits"].get(split, {})
    missing = [b for b in VQA_BENCHMARKS if b not in files]
    if missing:
        raise ValueError(f"{manifest_path}: split {split!r} lacks benchmarks {missing}")
    return {b: load_evalset(str(Path(manifest_path).parent / files[b])) for b in VQA_BENCHMARKS}


def _samples(items: Iterable[Mapping[str, Any]], prefix: str) -> list[VqaSample]:
    drop = {"image", "question", "answer", "image_id", "benchmark"}
    return [VqaSample(f"{prefix}/{it['image_id']}", str(it["question"]), str(it["answer"]), str(it["benchmark"]),
                      {k: v for k, v in it.items() if k not in drop}) for it in items]


def _corpus(manifest_path: str | Path, limit: int) -> tuple[list[VqaSample], dict[str, Any]]:
    from webssl_repro.data.corpus import read_manifest
    from webssl_repro.data.shards import make_loader

    samples, images = [], {}
    for s in make_loader(read_manifest(manifest_path)["shards"], shuffle_shards=False, rank=0, world_size=1):
        meta = s.get("meta") or {}
        image_id = f"corpus/{meta.get('id', s['__key__'])}"
        images[image_id] = s["image"]
        samples.append(VqaSample(image_id, "Describe the image briefly.", str(meta.get("caption", ""))))
        if len(samples) >= limit:
            break
    return samples, images


def _batches(images: Mapping[str, Any], size: int, batch: int = 256):
    ids = sorted(images)
    for k in range(0, len(ids), batch):
        chunk = ids[k:k + batch]
        yield chunk, images_tensor([{"image": images[i]} for i in chunk], size)


def run_vqa(encoder, meta: Mapping[str, Any], manifests: Mapping[str, str | Path], cfg: Mapping[str, Any],
            workdir: str | Path) -> dict[str, Any]:
    from webssl_repro.evaluate.vqa.lm import build_tokenizer
    from webssl_repro.evaluate.vqa.probe import VqaConfig, build_probe, fit_and_evaluate

    for needed in ("vqa", "shards"):
        if needed not in manifests:
            raise ValueError(f"vqa evaluation needs the {needed!r} manifest; got {sorted(manifests)}")
    options = {k: v for k, v in cfg.items() if k not in ("scale", "alignment_samples")}
    config = VqaConfig.from_mapping(options)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    alignment, images = _corpus(manifests["shards"], int(cfg.get("alignment_samples", 1024)))
    train_items, test_items = _vqa_split(manifests["vqa"], "train"), _vqa_split(manifests["vqa"], "test")
    instruction = [s for b in VQA_BENCHMARKS for s in _samples(train_items[b], "vqa")]
    tests = {b: _samples(test_items[b], "vqa") for b in VQA_BENCHMARKS}
    for items in (*train_items.values(), *test_items.values()):
        for it in items:
            images.setdefault(f"vqa/{it['image_id']}", it["image"])

    features = extract_features(encoder, _batches(images, int(meta["img_size"])), config.tokens,
                                workdir / "features.safetensors")
    tokenizer = None
    if config.language_model == "tiny":  # mini: a word-level vocabulary of the training texts only
        texts = [f"{s.question} {s.answer}" for s in alignment + instruction]  # never the test split
        tokenizer = build_tokenizer(texts, workdir / "tokenizer.json")
    probe = build_probe(config, encoder.embed_dim, tokenizer)
    result = fit_and_evaluate(config, probe, features, alignment, instruction, tests)
    metrics: dict[str, Any] = dict(result["benchmarks"])
    metrics.update(result["categories"])
    metrics["_training"] = result["training"]
    return metrics
