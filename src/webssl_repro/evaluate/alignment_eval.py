"""Vision-language alignment of a frozen encoder (paper Fig. 9, Huh et al.'s protocol).

Vision: the CLS token after every block, before the final norm (the residual stream);
language: the token-mean of every hidden state of each LM, embeddings included; score:
mutual k-NN (k=10) after one 95th-percentile clamp per model, max over layer pairs.
Mini: the 1024 mini-web image-caption pairs and the offline MiniLM; paper: WIT-1024 and
Llama-3.1 8B / 70B loaded by path or id through ``transformers``.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from webssl_repro.config import check_keys
from webssl_repro.evaluate.alignment import alignment_score, alignment_se, clamp_layers, pair_hits
from webssl_repro.evaluate.imagesets import images_tensor, load_split
from webssl_repro.evaluate.features import block_cls, model_device

# exact: the outlier clamp of platonic.Alignment.score (one sorted threshold per model); false:
# measure_alignment.py's default (the mean of the samples' quantiles). The paper does not say which.
DEFAULTS = {"language_models": ["minilm"], "k": 10, "q": 0.95, "exact": True, "batch_size": 64, "lm_batch_size": 32,
            "lm_paths": {}}


def vision_layers(encoder, meta: Mapping[str, Any], records, batch: int) -> torch.Tensor:
    """Un-normed CLS after every block, (L, N, D), on the encoder's device, fp32."""
    x = images_tensor(records, int(meta["img_size"]))
    if isinstance(encoder, torch.nn.Module):
        encoder.eval()
    device = model_device(encoder)
    with torch.no_grad():
        return torch.cat([block_cls(encoder, x[i:i + batch].to(device)).float().cpu()
                          for i in range(0, len(x), batch)], dim=1)


def lm_source(name: str, cfg: Mapping[str, Any]) -> str:
    """Where language model ``name``'s weights are read from: MiniLM's bundled files, else
    ``lm_paths.<name>`` (a local copy or a hub id the cluster caches), else ``name`` itself."""
    if name == "minilm":
        from webssl_repro.evaluate.language import minilm_path

        return str(minilm_path())
    from webssl_repro.files import model_location

    return model_location(cfg["lm_paths"].get(name, name), f"evaluate.alignment.lm_paths.{name}")


def lm_identity(source: str) -> list:
    """What ties cached LM features to their weights: the source, and for a local copy its
    config and weight files' names, sizes and times (``lm_paths`` pointed at another checkpoint,
    or the copy replaced, computes them again)."""
    from webssl_repro.evaluate.progress import file_identity

    folder = Path(source)
    files = sorted(p for p in folder.glob("*") if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
                   or p.name.endswith(".index.json")) if folder.is_dir() else []
    return [source, *(file_identity(p) for p in files)]


def language_layers(name: str, captions: list[str], cfg: Mapping[str, Any], cache_dir: Path | None) -> torch.Tensor:
    """LM features, cached per (LM weights, caption set): every run shares them."""
    from webssl_repro.evaluate.features import save_atomic
    from webssl_repro.evaluate.language import lm_layer_features, load_minilm

    source = lm_source(name, cfg)
    cache = None
    if cache_dir is not None:
        identity = json.dumps(lm_identity(source), sort_keys=True)
        key = hashlib.sha1("\n".join([identity, *captions]).encode()).hexdigest()[:12]
        cache = cache_dir / f"lm-{name.replace('/', '_')}-{len(captions)}-{key}.pt"
        if cache.exists():
            try:
                return torch.load(cache, weights_only=True)
            except Exception as err:  # noqa: BLE001 - derived data: computed again, and rewritten whole
                warnings.warn(f"LM feature cache {cache} is unreadable ({type(err).__name__}: {err}); "
                              "computing the features again", RuntimeWarning)
    if name == "minilm":
        model, tokenizer = load_minilm()
    else:  # paper scale: Llama-3.1 by local path (or hub id where the cluster has a cache)
        from transformers import AutoModel, AutoTokenizer

        from webssl_repro.files import hub_access

        # On GPUs, accelerate's device_map spreads a model too large for one (Llama-3.1-70B in
        # bf16: ~140 GB) over all of the job's; on CPU it loads whole.
        placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
        with hub_access(f"evaluate.alignment.lm_paths.{name}", source):
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source, torch_dtype=torch.bfloat16, **placement)
    feats = lm_layer_features(model, tokenizer, captions, batch_size=int(cfg["lm_batch_size"])).float()
    if cache is not None:  # concurrent alignment jobs share it
        save_atomic(feats, cache)
    return feats


def run_alignment(encoder, meta: Mapping[str, Any], captions_manifest: str | Path, cfg: Mapping[str, Any],
                  cache_dir: Path | None = None) -> dict[str, Any]:
    check_keys(cfg, {*DEFAULTS, "scale"}, "evaluate.alignment")
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if k != "scale"}}
    records = load_split(captions_manifest, "test")
    captions = [str(r["caption"]) for r in records]
    k, q, exact = int(cfg["k"]), float(cfg["q"]), bool(cfg["exact"])
    # each model's clamp threshold once: the score and its standard error are then taken at q=1
    vis = clamp_layers(vision_layers(encoder, meta, records, int(cfg["batch_size"])), q, exact)
    metrics: dict[str, Any] = {}
    for lm in cfg["language_models"]:
        lang = clamp_layers(language_layers(lm, captions, cfg, cache_dir), q, exact)
        score, (i, j) = alignment_score(vis, lang, k=k, q=1.0)
        metrics[f"alignment/{lm}"] = float(score)
        metrics[f"_alignment/{lm}/layers"] = {"vision": int(i), "language": int(j)}
        metrics[f"_alignment/{lm}/se"] = alignment_se(pair_hits(vis, lang, (i, j), k=k, q=1.0), k)
    return metrics
