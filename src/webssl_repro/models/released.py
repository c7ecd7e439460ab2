"""The released Web-SSL checkpoints and the off-the-shelf encoders of the paper's comparisons
(``releases``) as runs: each is read (``models.hf``), checked against the architecture and
resolution it was released with, and written as a run directory's encoder, so every evaluation
reads an imported run as it reads a trained one."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from webssl_repro.models import convert
from webssl_repro.models.hf import arch_header, import_hf, import_native
from webssl_repro.models.vit import Arch, WebSSLViT, arch_for, resample_pos_embed
from webssl_repro.releases import (NO_PTH, OFF_THE_SHELF, PTH_URL, RELEASED, checkpoint_of, directory_only,
                                   importable_runs)


_ID = re.compile(r"^webssl-(?P<method>dino|mae)(?P<size>\d+[mb])-(?P<data>full|light|heavy)"
                 r"(?P<samples>\d+b)-(?P<res>\d+)$")


@dataclass(frozen=True)
class Released:
    """One released checkpoint and the run it stands in for."""

    hf_id: str  # "" for an off-the-shelf encoder without a hub repo (``releases.on_the_hub``)
    method: str
    size: str
    data: str
    samples: str
    img_size: int  # the run's resolution, at which it is evaluated
    run: str  # our run name, e.g. 'dino7b-full8b-518', or an off-the-shelf id, e.g. 'dinov2-g-224'
    revision: str | None  # HF commit to pin, when recorded
    pytorch_url: str | None
    trained_size: int = 0  # the resolution of the checkpoint's position embeddings (0: img_size)

    @property
    def arch(self) -> Arch:
        return arch_for(self.method, self.size)

    @property
    def weights_size(self) -> int:
        return self.trained_size or self.img_size

    @property
    def checkpoint(self) -> str:
        """What the run imports, as ``releases.checkpoint_of`` names it: the HF id, else the native file."""
        return self.hf_id or str(self.pytorch_url)


def released_checkpoint(hf_id: str) -> Released:
    """Fields of a released id, with or without the ``facebook/`` owner."""
    name = hf_id.split("/", 1)[1] if hf_id.startswith("facebook/") else hf_id
    if name not in RELEASED:
        raise KeyError(f"{hf_id!r} is not a released Web-SSL checkpoint; known: "
                       f"{sorted('facebook/' + k for k in RELEASED)}")
    m = _ID.match(name)
    assert m is not None, name  # every table entry follows the id grammar
    return Released(
        hf_id=f"facebook/{name}", method=m["method"], size=m["size"], data=m["data"],
        samples=m["samples"], img_size=int(m["res"]), run=name[len("webssl-"):],
        revision=RELEASED[name] or None,
        pytorch_url=None if name in NO_PTH else PTH_URL.format(name.replace("-", "_")))


def released_checkpoints() -> list[Released]:
    """All released checkpoints, in the order of paper_facts §8.1."""
    return [released_checkpoint(k) for k in RELEASED]


def run_checkpoint(run: str) -> Released:
    """The checkpoint a run imports (``pretrain.run_sources``): its Web-SSL release, or an
    off-the-shelf encoder of the paper's comparisons (``releases.OFF_THE_SHELF``: e.g. DINOv2 ViT-g,
    trained at 518 px, as the run ``dinov2-g-224`` evaluated at 224 px, or MAE ViT-H as ``mae-h-224``)."""
    if run in OFF_THE_SHELF:
        o = OFF_THE_SHELF[run]
        return Released(hf_id=o["hf_id"], method=o["method"], size=o["size"], data=o["data"], samples="",
                        img_size=int(o["img_size"]), run=run, revision=o["revision"] or None,
                        pytorch_url=o["pytorch_url"], trained_size=int(o["trained_size"]))
    if checkpoint_of(run) is None:
        raise KeyError(f"no checkpoint to import is run {run!r}; the importable runs are {importable_runs()}")
    return released_checkpoint(f"webssl-{run}")


def at_resolution(encoder: WebSSLViT, meta: Mapping[str, Any], img_size: int, arch: Arch, *,
                  source: str) -> tuple[WebSSLViT, dict[str, Any]]:
    """``encoder`` rebuilt for ``img_size`` px, its position embeddings resampled once as DINOv2's
    ``interpolate_pos_encoding`` resamples them at every forward (``vit.resample_pos_embed``):
    the features of that size are unchanged, and the evaluations, which feed an encoder images
    of its own ``img_size``, see the resolution the paper evaluated the checkpoint at."""
    state = encoder.state_dict()
    grid, n_prefix = img_size // arch.patch, encoder.num_prefix_tokens  # 0 for a tower without class token
    before = round((state["pos_embed"].shape[1] - n_prefix) ** 0.5)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (grid, grid), n_prefix)
    out = convert.load_into_encoder(state, meta["method"], arch, img_size, source=source)
    note = (f"pos_embed resampled from {before}x{before} ({meta['img_size']} px) to {grid}x{grid} "
            f"({img_size} px), as DINOv2 interpolates at every forward")
    return out, {**meta, "img_size": int(img_size), "notes": [*meta.get("notes", []), note]}


def load_released(checkpoint: str | Released, source: str | Path | None = None, *, allow_download: bool = False
                  ) -> tuple[WebSSLViT, dict[str, Any]]:
    """Encoder of a released checkpoint (an id, or ``run_checkpoint(run)``) from ``source``: a
    local HF directory, a native ``.pth``/``.pt`` file, or (``source=None`` with
    ``allow_download=True``, paper scale only) the hub id itself at its pinned revision. The
    result is checked against the released architecture and resolution so a wrong file cannot
    stand in for the run; a checkpoint trained at another resolution than its run's is then
    resampled to it (``at_resolution``).
    """
    rel = released_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if source is None:
        if not rel.hf_id:
            raise FileNotFoundError(f"{rel.run}: {rel.checkpoint} is on no hub to download it from; give a "
                                    "local copy of that file")
        if not allow_download:
            raise FileNotFoundError(f"{rel.hf_id}: no local source given; set one in the config "
                                    "or allow the download (paper scale)")
        encoder, meta = import_hf(rel.hf_id, allow_download=True, revision=rel.revision)
    elif Path(source).is_dir():
        encoder, meta = import_hf(source)
    elif directory_only(rel.run) and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such directory (a local copy of {rel.checkpoint}, a transformers model)")
    else:
        encoder, meta = import_native(source, rel.method, rel.arch, rel.weights_size)
    if (meta["method"], meta["arch"], meta["img_size"]) != (
            rel.method, arch_header(rel.arch, rel.method), rel.weights_size):
        raise ValueError(f"{source}: holds a {meta['method']} {meta['arch']} @ {meta['img_size']}px "
                         f"encoder, but {rel.checkpoint} is a {rel.method} {arch_header(rel.arch, rel.method)} "
                         f"@ {rel.weights_size}px")
    if rel.img_size != rel.weights_size:
        encoder, meta = at_resolution(encoder, meta, rel.img_size, rel.arch, source=str(source or rel.checkpoint))
    meta.update(released=asdict(rel))
    return encoder, meta


def write_run_encoder(encoder: WebSSLViT, meta: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``encoder.safetensors`` (+ ``provenance.json``) in the run-dir format of
    ``train.run``, so ``load_encoder`` and every eval rule treat an imported run like a
    trained one."""
    from webssl_repro.models.io import save_encoder

    header = {k: meta[k] for k in ("method", "arch", "img_size")}
    prov = {"run_source": "imported", "checkpoint": str(meta.get("source")), "encoder": header,
            **{k: meta[k] for k in ("released", "ignored_keys", "notes") if k in meta}}
    return save_encoder(encoder.state_dict(), header, prov, out_dir)


def import_released(checkpoint: str | Released, source: str | Path | None, out_dir: str | Path, *,
                    allow_download: bool = False) -> Path:
    """The ``released`` run source in one call: load, verify, write the run-dir encoder."""
    encoder, meta = load_released(checkpoint, source, allow_download=allow_download)
    return write_run_encoder(encoder, meta, out_dir)
