"""The ``vqa`` stage for one run: frozen encoder → visual tokens → two-stage probe → 16 scores.

The data follow ``evaluate.vqa.language_model``:

* ``tiny`` (mini): stage-1 (alignment) data are the pretraining corpus' image-caption
  pairs, as Cambrian-Alignment is separate from the benchmarks; stage-2 (instruction) data
  are the train splits of the 16 mini-web benchmark analogues; scores come from their test
  splits. The encoder runs once over every image (``FeatureCache`` in the run's work dir);
  the LM stages only read the cache.
* anything else (paper: Llama-3-8B-Instruct): stage 1 on Cambrian-Alignment, stage 2 on
  Cambrian-7M, LAION rows excluded, scores on the 16 real benchmarks, all located by
  ``evaluate.vqa.data`` (``webssl_repro.evaluate.vqa.paper``). 7M × 576 tokens cannot be
  cached, so the frozen encoder runs on the fly (``real.EncoderFeatures``).

The workflow runs the stage as two jobs: ``train_vqa_probe`` trains the probe and saves it
(``vqa.trained``), ``answer_vqa`` answers the benchmarks with it, so that a change to how the
probe answers (``config.ANSWER_KEYS``) does not train it again. ``run_vqa`` does both in one
process, to the same numbers.

``evaluate.vqa.strategy`` (``ddp``/``fsdp2``) runs the probe data-parallel over the ranks of
a torchrun launch (``webssl_repro.evaluate.vqa.distributed``); every rank returns the metrics,
the CLI writes them on rank 0 only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from webssl_repro.evaluate.imagesets import images_tensor
from webssl_repro.files import read_json
from webssl_repro.evaluate.progress import EvalProgress
from webssl_repro.evaluate.vqa.data import VqaSample, extract_features, samples_from_items
from webssl_repro.evaluate.vqa.config import VqaConfig
from webssl_repro.metrics import VQA_BENCHMARKS
from webssl_repro.models.io import trained_pixel_mean

if TYPE_CHECKING:
    from webssl_repro.train.distributed import DistEnv

#: Cambrian pads each image to a square (image_aspect_ratio=pad) before its processor
VQA_FIT = "pad"


def vqa_split(manifest_path: str | Path, split: str) -> dict[str, list[dict[str, Any]]]:
    """The 16 benchmark analogues' items of one split of a mini-web VQA eval set, by benchmark."""
    from webssl_repro.data.evalsets import load_evalset

    manifest = read_json(manifest_path)
    files = manifest["splits"].get(split, {})
    missing = [b for b in VQA_BENCHMARKS if b not in files]
    if missing:
        raise ValueError(f"{manifest_path}: split {split!r} lacks benchmarks {missing}")
    return {b: load_evalset(str(Path(manifest_path).parent / files[b])) for b in VQA_BENCHMARKS}


def _corpus(manifest_path: str | Path, limit: int) -> tuple[list[VqaSample], dict[str, Any]]:
    from webssl_repro.data.corpus import read_manifest
    from webssl_repro.data.loader import make_loader

    samples, images = [], {}
    for s in make_loader(read_manifest(manifest_path)["shards"], shuffle_shards=False, rank=0, world_size=1):
        meta = s.get("meta") or {}
        image_id = f"corpus/{meta.get('id', s['__key__'])}"
        images[image_id] = s["image"]
        samples.append(VqaSample(image_id, "Describe the image briefly.", str(meta.get("caption", ""))))
        if len(samples) >= limit:
            break
    return samples, images


def _batches(images: Mapping[str, Any], size: int, pad_mean: Sequence[float], batch: int = 256):
    ids = sorted(images)
    for k in range(0, len(ids), batch):
        chunk = ids[k:k + batch]
        yield chunk, images_tensor([{"image": images[i]} for i in chunk], size, VQA_FIT, pad_mean=pad_mean)


def images_digest(images: Mapping[str, Any], size: int, pad_mean: Sequence[float]) -> str:
    """What ``_batches`` encodes: every image's id and pixels, at ``size``, ``VQA_FIT`` and
    ``pad_mean``."""
    import hashlib

    import numpy as np

    digest = hashlib.sha1(f"{size} {VQA_FIT} {tuple(pad_mean)}".encode())
    for image_id in sorted(images):
        pixels = np.ascontiguousarray(np.asarray(images[image_id]))
        digest.update(f"{image_id} {pixels.shape} {pixels.dtype}".encode())
        digest.update(pixels.tobytes())
    return digest.hexdigest()


#: Keys of ``evaluate.vqa`` that are the stage's, not ``VqaConfig``'s.
STAGE_KEYS = ("scale", "alignment_samples", "data", "controls")


@dataclass
class VqaInputs:
    """What a vqa job reads: its config, the samples of its part and their visual tokens."""

    config: VqaConfig
    features: Any  # a FeatureCache (mini) or the encoder run on the fly (paper, ``real.EncoderFeatures``)
    alignment: list[VqaSample]
    instruction: list[VqaSample]
    tests: dict[str, list[VqaSample]]
    vis_dim: int
    #: where the probe goes: None leaves it where ``build_probe`` put it (FSDP2 shards it from there)
    device: Optional[torch.device]
    tokenizer: Any = None  # a tiny LM's, built from the training texts
    counts: dict[str, Any] = field(default_factory=dict)


def _paper_inputs(encoder, meta: Mapping[str, Any], cfg: Mapping[str, Any], config: VqaConfig,
                  env: Optional[DistEnv], part: str) -> VqaInputs:
    """Cambrian-Alignment → Cambrian-7M → the 16 real benchmarks (``part``'s share), the encoder
    run on the fly. The mini-web manifests the rule passes are not read. The encoder and the
    probe go to the rank's device (the GPU when there is one); under ``strategy: fsdp2`` the
    probe stays on rank 0's host until ``fit_probe`` / ``parallelize`` shards it over the GPUs."""
    from webssl_repro.evaluate.vqa.paper import load_paper_data
    from webssl_repro.evaluate.vqa.real import EncoderFeatures

    if "alignment_samples" in cfg:
        raise ValueError("evaluate.vqa.alignment_samples caps the mini-web captions of stage 1; at this scale "
                         "stage 1 reads Cambrian-Alignment, capped by evaluate.vqa.data.alignment.limit")
    data = load_paper_data(cfg.get("data"), part)
    device = env.device if env is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval().requires_grad_(False)
    size, pad_mean = int(meta["img_size"]), trained_pixel_mean(encoder)
    features = EncoderFeatures(encoder, data.load_image,
                               lambda image: images_tensor([{"image": image}], size, VQA_FIT, pad_mean=pad_mean)[0],
                               config.tokens, device, config.precision)
    return VqaInputs(config, features, data.alignment, data.instruction, data.tests, encoder.embed_dim,
                     None if config.strategy == "fsdp2" else device, counts=data.counts)


def vqa_inputs(encoder, meta: Mapping[str, Any], manifests: Mapping[str, str | Path], cfg: Mapping[str, Any],
               workdir: str | Path, part: str = "all") -> VqaInputs:
    """The inputs of a vqa job: ``part`` ``train`` (the probe's two stages), ``test`` (the
    benchmarks it answers) or ``all``. At mini scale every part reads all the data and shares
    one feature cache in ``workdir``: the answering job reads what the training job wrote, and
    its visual tokens are the very numbers the probe trained beside; only ``train`` and ``all``
    build the tokenizer (the answering job reads the probe's)."""
    from webssl_repro.evaluate.vqa.distributed import init, main_first
    from webssl_repro.evaluate.vqa.lm import build_tokenizer
    from webssl_repro.evaluate.vqa.paper import PARTS

    if part not in PARTS:
        raise ValueError(f"vqa_inputs: part {part!r} is not one of {PARTS}")
    options = {k: v for k, v in cfg.items() if k not in STAGE_KEYS}
    config = VqaConfig.from_mapping(options)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    env = init(config.strategy)  # None (nothing initialised) for the default 'none'
    if config.language_model != "tiny":
        return _paper_inputs(encoder, meta, cfg, config, env, part)
    if cfg.get("data"):
        raise ValueError("evaluate.vqa.data locates the paper-scale (Cambrian + real benchmark) data; "
                         "language_model: tiny reads the mini-web eval sets and takes none")
    for needed in ("vqa", "shards"):
        if needed not in manifests:
            raise ValueError(f"vqa evaluation needs the {needed!r} manifest; got {sorted(manifests)}")

    alignment, images = _corpus(manifests["shards"], int(cfg.get("alignment_samples", 1024)))
    train_items, test_items = vqa_split(manifests["vqa"], "train"), vqa_split(manifests["vqa"], "test")
    instruction = [s for b in VQA_BENCHMARKS for s in samples_from_items(train_items[b], "vqa")]
    tests = {b: samples_from_items(test_items[b], "vqa") for b in VQA_BENCHMARKS}
    for items in (*train_items.values(), *test_items.values()):
        for it in items:
            images.setdefault(f"vqa/{it['image_id']}", it["image"])

    with main_first(env):  # rank 0 writes the feature cache, the other ranks read it
        size, pad_mean = int(meta["img_size"]), trained_pixel_mean(encoder)
        features = extract_features(encoder, _batches(images, size, pad_mean), config.tokens,
                                    workdir / "features.safetensors", inputs=images_digest(images, size, pad_mean))
    tokenizer = None
    if part != "test":  # mini: a word-level vocabulary of the training texts only
        # never the test split; the chat template's own words too, or USER/ASSISTANT are <unk>
        texts = [f"{s.question} {s.answer}" for s in alignment + instruction] + ["USER: ASSISTANT:"]
        tokenizer = build_tokenizer(texts)  # saved with the trained probe (``vqa.trained``)
    return VqaInputs(config, features, alignment if part != "test" else [], instruction if part != "test" else [],
                     tests if part != "train" else {}, encoder.embed_dim, env.device if env is not None else None,
                     tokenizer)


def _probe(inputs: VqaInputs, tokenizer: Any = None):
    from webssl_repro.evaluate.vqa.probe import build_probe

    probe = build_probe(inputs.config, inputs.vis_dim, tokenizer)
    return probe.to(inputs.device) if inputs.device is not None else probe


def _metrics(result: Mapping[str, Any], training: list[dict[str, Any]], counts: Mapping[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = dict(result["benchmarks"])
    metrics.update(result["categories"] or {})  # None unless all 16 benchmarks were answered
    # each category's and the Average's standard error over the questions, a detail "<metric>/se"
    metrics.update({f"_{name}/se": se for name, se in (result.get("standard_errors") or {}).items()})
    metrics["_training"] = training
    if counts:
        metrics["_data"] = dict(counts)
    return metrics


def run_vqa(encoder, meta: Mapping[str, Any], manifests: Mapping[str, str | Path], cfg: Mapping[str, Any],
            workdir: str | Path, progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """The VQA metrics of one encoder in one process: the probe trained, then answering (the
    workflow runs these as two jobs, ``train_vqa_probe`` and ``answer_vqa``). ``progress`` (the
    job's, ``evaluate.progress``) keeps each stage and each benchmark's answers, so that a job
    stopped at its time limit resumes."""
    from webssl_repro.evaluate.vqa.probe import fit_and_evaluate

    inputs = vqa_inputs(encoder, meta, manifests, cfg, workdir)
    probe = _probe(inputs, inputs.tokenizer)
    result = fit_and_evaluate(inputs.config, probe, inputs.features, inputs.alignment, inputs.instruction,
                              inputs.tests, progress=progress)
    return _metrics(result, result["training"], inputs.counts)


def train_vqa_probe(encoder, meta: Mapping[str, Any], manifests: Mapping[str, str | Path], cfg: Mapping[str, Any],
                    out: str | Path, workdir: str | Path, *, run: str = "",
                    progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """Train one encoder's VQA probe (stage 1, stage 2) and save it in ``out``
    (``vqa.trained``); returns its record. ``progress`` keeps each stage as a part."""
    from webssl_repro.evaluate.features import encoder_fingerprint
    from webssl_repro.evaluate.vqa.probe import fit_probe
    from webssl_repro.evaluate.vqa.trained import probe_hash, save_probe

    fingerprint = encoder_fingerprint(encoder)
    inputs = vqa_inputs(encoder, meta, manifests, cfg, workdir, part="train")
    probe = _probe(inputs, inputs.tokenizer)
    _, training = fit_probe(inputs.config, probe, inputs.features, inputs.alignment, inputs.instruction, progress)
    record = {"run": run, "config_hash": probe_hash(cfg), "encoder": fingerprint, "training": training,
              "data": inputs.counts}
    if progress is not None:  # 32 GB to write at paper scale: not in the job's last minutes (both stages are saved)
        progress.stop_point("saving the trained probe")
    save_probe(out, probe, record, tokenizer=inputs.tokenizer if inputs.config.language_model == "tiny" else None)
    return record


def answer_vqa(encoder, meta: Mapping[str, Any], manifests: Mapping[str, str | Path], cfg: Mapping[str, Any],
               probe_dir: str | Path, workdir: str | Path, *, run: Optional[str] = None,
               progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """The VQA metrics of one encoder, answered by its probe trained in ``probe_dir``
    (``train_vqa_probe``, with the same configuration but for ``config.ANSWER_KEYS``; of ``run``,
    where given). ``progress`` keeps each benchmark's answers as a part."""
    from webssl_repro.evaluate.features import encoder_fingerprint
    from webssl_repro.evaluate.vqa.distributed import parallelize
    from webssl_repro.evaluate.vqa.probe import answer_benchmarks
    from webssl_repro.evaluate.vqa.trained import check_encoder, load_probe, load_tokenizer_of, read_record

    record = read_record(probe_dir, cfg, run=run)  # before the data and the LM load
    check_encoder(probe_dir, record, encoder_fingerprint(encoder))
    inputs = vqa_inputs(encoder, meta, manifests, cfg, workdir, part="test")
    tiny = inputs.config.language_model == "tiny"
    probe = _probe(inputs, load_tokenizer_of(probe_dir) if tiny else None)
    parallel = parallelize(probe, inputs.config.strategy)
    load_probe(probe_dir, probe)
    result = answer_benchmarks(inputs.config, probe, inputs.features, inputs.tests, parallel=parallel,
                               progress=progress)
    return _metrics(result, record["training"], {**record.get("data", {}), **inputs.counts})
