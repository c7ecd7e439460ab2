"""One pretraining run from its config slice: method + data + loop + exported encoder.

``Plan.run_config(run)`` gives the slice (arch, image size, samples seen, the method's
recipe, the loop's settings, seed); this module turns it into a method object, an
index-addressed data stream and a ``TrainConfig``, trains (resuming if a checkpoint
exists), then writes the run directory: ``encoder.safetensors`` (the evaluation encoder:
the EMA teacher's backbone for Web-DINO), ``state.pt`` (every module of the method, to
start a high-resolution fine-tune from), ``train_log.jsonl`` and ``provenance.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from webssl_repro.files import atomic_write, code_version
from webssl_repro.models.io import save_encoder
from webssl_repro.resources import dino_local_crop
from webssl_repro.runs import Run

#: the folder of a run's checkpoints where a streamed corpus's readers record what they pass over
PASSED_OVER = "passed_over"


def build(run: Run, cfg: Mapping[str, Any], corpus, init_device: Optional[str] = None
          ) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    """(method, sample_fn, collate_fn, train_config mapping, encoder metadata). ``init_device``
    "meta": the method's modules without storage (an FSDP2 rank that takes rank 0's values)."""
    from webssl_repro.models.vit import Arch, build_encoder

    on_device = (lambda: torch.device(init_device)) if init_device else contextlib.nullcontext

    arch = Arch.from_config({**cfg["arch"], "ffn": "gelu" if run.method == "mae" else "swiglu"})
    img = int(cfg["img_size"])
    recipe = dict(cfg.get("recipe", {}))
    samples = int(cfg["samples_seen"])
    loop = dict(cfg.get("train", {}))
    meta = {"method": run.method, "arch": cfg["arch"], "img_size": img}
    layerscale = recipe.get("layerscale", 1e-5)
    if run.method in ("dino", "clip") and not (isinstance(layerscale, (int, float)) and layerscale > 0):
        # a tower without it would train to the end and then fit no loader (encoder file, HF export)
        raise ValueError(f"pretrain.{run.method}.layerscale: {layerscale!r}; LayerScale's initial gain must be > 0")

    if run.method == "dino":
        from webssl_repro.data.augmentations import blur_kernel_size, blur_sigma_range, with_ibot_masks
        from webssl_repro.data.multicrop import BatchedMultiCrop
        from webssl_repro.methods.dino import DinoConfig, DinoMethod

        recipe.setdefault("global_crop_size", img)
        recipe.setdefault("local_crop_size", dino_local_crop(img, arch.patch))
        probe = DinoConfig.from_mapping(recipe)
        steps = math.ceil(samples / probe.batch_size)
        config = DinoConfig.from_mapping({**recipe, "total_steps": steps})
        with on_device():
            method = DinoMethod(arch, config)
        aug = BatchedMultiCrop(config.global_crop_size, config.local_crop_size, config.n_local_crops,
                               config.global_crops_scale, config.local_crops_scale,
                               blur_sigma=blur_sigma_range(config.blur_reference_size),
                               blur_kernel=blur_kernel_size(config.blur_reference_size))

        def sample_fn(image, _meta, gen):
            return aug.crops(image, gen)

        def collate_fn(samples_, gen):
            return with_ibot_masks(aug.collate(samples_, gen), arch.patch, config.mask_ratio_min_max,
                                   config.mask_sample_probability, generator=gen)

        train_cfg = dict(global_batch_size=config.batch_size, lr=config.lr, min_lr=config.min_lr,
                         warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                         weight_decay_end=config.weight_decay_end, betas=tuple(config.betas),
                         grad_clip=config.clip_grad)
    elif run.method == "mae":
        from webssl_repro.methods.mae import MaeConfig, MaeMethod, mae_transform

        config = MaeConfig.from_mapping(recipe)
        with on_device():
            method = MaeMethod(build_encoder(arch, "mae", img_size=img), config)
        transform = mae_transform(img, scale=tuple(config.crop_scale))
        sample_fn = _seeded(transform)
        collate_fn = _stack_images
        train_cfg = dict(global_batch_size=config.batch_size, lr=config.lr, min_lr=config.min_lr,
                         warmup_steps=config.warmup_iters, weight_decay=config.weight_decay,
                         weight_decay_end=config.weight_decay, betas=tuple(config.betas))
    elif run.method == "clip":
        from webssl_repro.methods.clip import RECIPE_EXTRAS, ClipConfig, ClipMethod, clip_transform
        from webssl_repro.models.text import build_tokenizer, load_tokenizer

        extras = {key: recipe.pop(key) for key in RECIPE_EXTRAS if key in recipe}
        tokenizer_path, revision = extras.get("tokenizer"), extras.get("tokenizer_revision")
        vocab = int(extras.get("vocab_size", 2048))
        layerscale = float(extras.get("layerscale", 1e-5))  # the vision tower's, as Web-DINO's
        config = ClipConfig.from_mapping(recipe)
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path, revision=revision)
        elif hasattr(corpus, "caption_texts"):  # mini: a tokenizer learned offline from this corpus' captions
            tokenizer = build_tokenizer(corpus.caption_texts(), vocab, cfg["_workdir"] + "/tokenizer.json")
        else:
            raise ValueError("pretrain.clip.tokenizer: a streamed corpus (pretrain.loader.stream) cannot learn a "
                             "tokenizer from its captions; name a tokenizer file or hub repo")
        with on_device():
            method = ClipMethod(build_encoder(arch, "clip", img_size=img, layerscale=layerscale), tokenizer, config)
        transform = clip_transform(img, scale=tuple(config.crop_scale))
        sample_fn = _seeded(transform, with_caption=True)
        collate_fn = _stack_images
        train_cfg = dict(global_batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_iters,
                         weight_decay=config.weight_decay, weight_decay_end=config.weight_decay,
                         betas=tuple(config.betas), eps=config.eps)
    else:
        raise ValueError(f"unknown method {run.method!r}")
    train_cfg.update(samples_seen=samples, seed=int(cfg.get("seed", 0)), **loop)
    return method, sample_fn, collate_fn, train_cfg, meta


def _seeded(transform, with_caption: bool = False):
    """A torchvision transform made a function of the sample's own generator (not global RNG)."""
    from webssl_repro.data.augmentations import global_rng_seeded

    def sample_fn(image, meta, gen):
        with global_rng_seeded(int(torch.randint(0, 2**31 - 1, (1,), generator=gen))):
            x = transform(image)
        if with_caption and not meta["caption"]:
            raise ValueError(f"sample {meta['id']} has no caption for CLIP: captions are read from the json's "
                             "'caption', MetaCLIP's 'texts' or a .txt member")
        return (x, meta["caption"]) if with_caption else (x, None)

    return sample_fn


def _stack_images(samples, _gen):
    batch = {"images": torch.stack([s[0] for s in samples])}
    if samples[0][1] is not None:
        batch["captions"] = [s[1] for s in samples]
    return batch


def _load_parent(method, parent_state: Path) -> None:
    """Start a hi-res fine-tune from the 224 px run: every module of its ``state.pt`` (the whole
    Web-DINO method; MAE's or CLIP's model), learned pos-embeds resampled. MAE's is a fixed
    sin-cos table (``fixed_tables``): the child keeps its own, made for its grid."""
    from webssl_repro.models.vit import resample_pos_embed

    state = torch.load(parent_state, map_location="cpu", weights_only=True)
    target = _exported(method)
    own, fixed = target.state_dict(), set(getattr(target, "fixed_tables", ()))
    for key, value in list(state.items()):
        if key.endswith("pos_embed") and key in own and own[key].shape != value.shape:
            if key in fixed:
                state[key] = own[key]
                continue
            n_prefix = 1
            grid = int(math.isqrt(own[key].shape[1] - n_prefix))
            state[key] = resample_pos_embed(value, (grid, grid), n_prefix)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:  # a parent of another size: one line, not torch's list of every tensor
        key = mismatched[0]
        raise ValueError(f"parent checkpoint {parent_state} is another model: {key} is {tuple(state[key].shape)} "
                         f"there, {tuple(own[key].shape)} here ({len(mismatched)} tensors differ)")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"parent checkpoint {parent_state} is not of this method: "
                         + (f"unexpected keys {unexpected[:5]}" if unexpected else f"no {missing[:5]}"))


def _exported(method) -> torch.nn.Module:
    """What ``state.pt`` holds: the whole method if it is a module (student, teacher, heads,
    centers), else its trained ``model``."""
    return method if isinstance(method, torch.nn.Module) else method.model


def provenance(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from webssl_repro.config import config_hash
    from webssl_repro.files import package_version as version

    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return {"config": config, "config_hash": config_hash(config), "git_commit": code_version(),
            "python": platform.python_version(),
            "packages": {p: version(p) for p in ("torch", "torchvision", "timm", "webdataset", "transformers",
                                                 "webssl-repro")}}


def open_corpus(shards: list[str], seed: int, loader: Mapping[str, Any], needs_caption: bool = False,
                record_dir: Optional[str | Path] = None):
    """``pretrain.loader``: the corpus held in memory (``IndexedCorpus``, the default) or, with
    ``stream: true``, streamed from its shards (``ShardCorpus``: MC-2B does not fit in memory);
    either's batches made by ``workers`` dataloader processes per rank. ``needs_caption`` (CLIP) passes over
    samples without an alt-text, which would otherwise stop the run at the same step on every retry.
    A streamed corpus's readers record what they pass over in ``record_dir`` (``stream_corpus.passed_over``)."""
    from webssl_repro.config import check_keys
    from webssl_repro.data.corpus import IndexedCorpus
    from webssl_repro.data.stream_corpus import ShardCorpus

    check_keys(loader, ("stream", "workers"), "pretrain.loader")
    workers = int(loader.get("workers", 0))
    if loader.get("stream", False):
        return ShardCorpus(shards, seed=seed, workers=workers, needs_caption=needs_caption, record_dir=record_dir)
    return IndexedCorpus(shards, seed=seed, workers=workers, needs_caption=needs_caption)


def pretrain(run_name: str, cfg: Mapping[str, Any], out_dir: str | Path, checkpoints: str | Path,
             data: list[str], parent: Optional[str] = None, max_steps: Optional[int] = None):
    """Train (or resume) ``run_name`` and write its run directory; returns the loop's result."""
    from webssl_repro.data.corpus import read_manifest
    from webssl_repro.train import TrainConfig, train
    from webssl_repro.train.checkpoint import full_state_on_rank0, latest_path, read_pointer
    from webssl_repro.train.deadline import job_deadline
    from webssl_repro.train.distributed import is_main, shard_receiver

    run = Run.parse(run_name)
    out_dir, checkpoints = Path(out_dir), Path(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data[0])
    corpus = open_corpus(manifest["shards"], int(cfg.get("seed", 0)), cfg.get("loader") or {},
                         needs_caption=run.method == "clip", record_dir=checkpoints / PASSED_OVER)
    cfg = {**cfg, "_workdir": str(checkpoints)}
    torch.manual_seed(int(cfg.get("seed", 0)))  # initial weights: the same on every rank and in every run
    # Under FSDP2 only rank 0 builds the weights; the others take their shards of them
    # (distributed.prepare_model), so a node never holds eight full ViT-7B students and teachers.
    receiver = shard_receiver(str(cfg.get("train", {}).get("strategy", "none")))
    method, sample_fn, collate_fn, train_map, meta = build(run, cfg, corpus, init_device=receiver)
    if parent is not None and latest_path(checkpoints) is None and receiver is None:
        _load_parent(method, Path(parent))
    train_cfg = TrainConfig.from_mapping(train_map)
    if train_cfg.activation_checkpointing:
        from webssl_repro.models.layers import enable_activation_checkpointing

        enable_activation_checkpointing(method.model)

    trained = read_pointer(checkpoints)

    def data_factory(start_sample: int, rank: int, world_size: int):
        if trained is not None:
            corpus.check_resume(start_sample, int(trained["world_size"]), world_size)
        return corpus.batches(start_sample, rank, world_size, train_cfg.global_batch_size, sample_fn, collate_fn)

    result = train(method, data_factory, train_cfg, checkpoints, max_steps=max_steps,
                   deadline=job_deadline(train_cfg.stop_margin_s))
    if not result.complete:
        return result
    # Under FSDP2 the weights stay sharded after training: every rank takes part in gathering
    # them (a collective), and only rank 0 holds the full tensors and writes them.
    encoder_sd, state = full_state_on_rank0(method.encoder()), full_state_on_rank0(_exported(method))
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "state.pt", lambda f: torch.save(state, f))
        shutil.copy(checkpoints / "train_log.jsonl", out_dir / "train_log.jsonl")
        prov = provenance(cfg)
        # The recipe as the code resolved it (defaults filled in): the config alone does not say
        # what a run used when a default changes between commits.
        prov["recipe"] = {"method": dataclasses.asdict(method.config), "train": dataclasses.asdict(train_cfg)}
        # what the in-memory corpus skipped while indexing, or the streamed one's readers passed over
        stats = getattr(corpus, "stats", None)
        if stats is not None:
            prov["corpus_skipped"] = {"samples": stats.skipped_samples, "shards": stats.broken_shards,
                                      "errors": stats.errors[:10]}
            if run.method == "clip":  # samples without an alt-text, left out of CLIP's corpus
                prov["corpus_skipped"]["uncaptioned"] = int(corpus.uncaptioned)
        prov["trained_by"] = result.trained_by  # the export's commit (git_commit) need not be the training's
        prov.update(encoder=meta, corpus_shards=len(manifest["shards"]), steps=result.step,
                    samples_seen=result.samples_seen, **({"corpus_size": len(corpus)} if hasattr(corpus, "__len__") else {}))
        save_encoder(encoder_sd, meta, prov, out_dir)
    return result
