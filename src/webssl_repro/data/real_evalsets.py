"""The real evaluation sets at paper scale, behind the mini-web eval-set interface.

A manifest written by ``build_hf_evalset`` names a ``datasets`` dataset instead of tars;
``load_hf_split`` turns its rows into the same records ``data.evalsets.load_evalset``
returns (``image`` + ``label`` / ``seg`` / ``depth`` / ``caption``), so the classic and
alignment stages run unchanged. Nothing is downloaded by this module itself: ``datasets``
resolves the id (a hub id with a local cache on the cluster, or a local path).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Callable, Mapping, Optional

import numpy as np
from PIL import Image

from webssl_repro.config import ConfigError, check_keys

# task -> (default dataset id, config name, {our split: dataset split}, row adapter)
Adapter = Callable[[Mapping[str, Any]], dict[str, Any]]


def _image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        return Image.open(value).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def _array(value: Any) -> np.ndarray:
    if isinstance(value, Image.Image):
        return np.asarray(value)
    return np.asarray(value)


def _classification(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"image": _image(row["image"]), "label": int(row["label"])}


#: ADE20K's classes (scene_parse_150): annotations hold 0 ("other") and 1..150
ADE20K_CLASSES = 150


def _segmentation(row: Mapping[str, Any]) -> dict[str, Any]:
    # ADE20K (scene_parse_150): 0 = "other" -> ignore (255); classes 1..150 -> 0..149, as mmseg's reduce_zero_label
    seg = _array(row["annotation"]).astype(np.int64)
    low, high = int(seg.min(initial=0)), int(seg.max(initial=0))
    if low < 0 or high > ADE20K_CLASSES:
        # else the probe's loss fails on "Target 254 is out of bounds" hours in, naming nothing
        raise ValueError(f"annotation holds values {low}..{high}: expected ADE20K's 0 (other) and classes "
                         f"1..{ADE20K_CLASSES}; a copy already reduced (mmseg's 0..{ADE20K_CLASSES - 1}, 255 = ignore) "
                         "must be given with its original labels, which are reduced here")
    seg = np.where(seg == 0, 255, seg - 1).astype(np.uint8)
    return {"image": _image(row["image"]), "seg": seg}


#: deeper than any NYUd frame (the Kinect reads to ~10 m): a map past it is not in metres
MAX_METRES = 100.0


def _depth(row: Mapping[str, Any]) -> dict[str, Any]:
    """NYUd's ``depth_map`` in metres (float, as sayakpaul/nyu_depth_v2 stores it). A copy made from
    the BTS / DINOv2 files holds millimetres in 16-bit PNGs: read as metres, nearly every pixel
    would fall outside the depth bins and the probe would be scored on almost nothing."""
    depth = _array(row["depth_map"])
    # NaN / inf mark pixels without depth in some copies: not read as a unit, and made 0 below,
    # NYUd's own "no depth", which the probe's masks leave out (an inf would pass ``target > 0``)
    deepest = float(depth[np.isfinite(depth)].max(initial=0.0))
    if not np.issubdtype(depth.dtype, np.floating) or deepest > MAX_METRES:
        raise ValueError(f"depth_map is {depth.dtype} with values up to {deepest:g}: expected "
                         f"float metres (at most {MAX_METRES:g}); a copy storing millimetres (BTS / DINOv2 16-bit "
                         "PNGs) needs them divided by 1000 when it is made")
    return {"image": _image(row["image"]), "depth": np.where(np.isfinite(depth), depth, 0).astype(np.float32)}


def _captions(row: Mapping[str, Any]) -> dict[str, Any]:
    text = row.get("text") or row.get("caption")
    if isinstance(text, (list, tuple)):
        text = text[0]  # the Platonic-representation code uses caption index 0
    return {"image": _image(row["image"]), "caption": str(text)}


#: The hub's ADE20K and NYUd v2 ship loading scripts, which ``datasets`` no longer runs (nor
#: 2.x / 3.x without ``trust_remote_code``): these tasks have no default dataset, and the dry
#: run asks for a copy (``check_hf_evalsets``) instead of the first classic job, after pretraining.
SCRIPT_ONLY: dict[str, str] = {"segmentation": "zhoubolei/scene_parse_150", "depth": "sayakpaul/nyu_depth_v2"}

HF_EVALSETS: dict[str, dict[str, Any]] = {
    "classification": {"dataset": "ILSVRC/imagenet-1k", "config": None,
                       "splits": {"train": "train", "val": "validation"}, "adapter": _classification},
    "segmentation": {"dataset": None, "config": None, "splits": {"train": "train", "val": "validation"},
                     "adapter": _segmentation, "n_classes": ADE20K_CLASSES},
    "depth": {"dataset": None, "config": None, "splits": {"train": "train", "val": "validation"}, "adapter": _depth},
    "captions": {"dataset": "minhuh/prh", "config": None, "revision": "wit_1024",
                 "splits": {"test": "train"}, "adapter": _captions},
}


def _no_default(task: str) -> str:
    return (f"data.evalsets.{task}.dataset is not set, and has no default: the hub's {SCRIPT_ONLY[task]} ships "
            "a loading script, which datasets does not run. Point it at a copy without one: a folder written by "
            "DatasetDict.save_to_disk, or a folder or hub repo of parquet files")


def check_hf_evalsets(evalsets: Mapping[str, Any], tasks: Sequence[str]) -> None:
    """Each of ``tasks`` names a dataset where it has no default (``SCRIPT_ONLY``)."""
    for task in tasks:
        if HF_EVALSETS[task]["dataset"] is None and not (evalsets.get(task) or {}).get("dataset"):
            raise ConfigError(_no_default(task))


def build_hf_manifest(task: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of a real eval set: which dataset, config and splits (overridable by config)."""
    if task not in HF_EVALSETS:
        raise KeyError(f"no real-data eval set for task {task!r}; known: {sorted(HF_EVALSETS)}")
    base = HF_EVALSETS[task]
    check_keys(section, {"dataset", "config", "revision", "splits", "limit"}, f"data.evalsets.{task}")
    check_hf_evalsets({task: section}, [task])
    from webssl_repro.files import model_location

    model_location(section.get("dataset", base["dataset"]), f"data.evalsets.{task}.dataset")  # a local copy exists
    return {"task": task, "source": "hf", "dataset": section.get("dataset", base["dataset"]),
            "config": section.get("config", base["config"]), "revision": section.get("revision", base.get("revision")),
            "splits": dict(section.get("splits", base["splits"])), "limit": section.get("limit"),
            **({"n_classes": base["n_classes"]} if "n_classes" in base else {})}


class HFSplit(Sequence):
    """One split's rows as records, each decoded when indexed: ImageNet's 1.28M training images
    are read batch by batch, never held at once. ``limit`` keeps the first rows only."""

    def __init__(self, dataset: Any, adapter: Adapter, limit: Optional[int] = None, name: str = "dataset") -> None:
        self.dataset, self.adapter, self.name = dataset, adapter, name
        self.n = len(dataset) if limit is None else min(len(dataset), int(limit))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} of a {self.n}-row split")
        row = self.dataset[int(i) % self.n]
        try:
            return self.adapter(row)
        except KeyError as err:  # another dataset's columns: say which it has
            raise ValueError(f"{self.name}: rows lack column {err.args[0]!r} (they have {sorted(row)}); point the "
                             "key at a copy with the task's columns") from None
        except ValueError as err:  # a column in another unit or format: say which dataset and row
            raise ValueError(f"{self.name}, row {int(i) % self.n}: {err}") from None


def load_hf_split(manifest: Mapping[str, Any], split: str, dataset: Optional[Any] = None) -> HFSplit:
    """Records of one split; ``dataset`` may be passed in (tests use ``datasets.Dataset.from_list``)."""
    task = manifest["task"]
    if split not in manifest["splits"]:
        raise ValueError(f"eval set {manifest['dataset']} has no {split!r} split (has {sorted(manifest['splits'])})")
    if dataset is None:
        dataset = _load(manifest, manifest["splits"][split])
    limit = manifest.get("limit")
    return HFSplit(dataset, HF_EVALSETS[task]["adapter"], None if limit is None else int(limit),
                   name=f"data.evalsets.{task}.dataset {manifest['dataset']}")


def _load(manifest: Mapping[str, Any], split: str) -> Any:
    """One split of the manifest's dataset: a ``DatasetDict.save_to_disk`` folder is
    memory-mapped as it is (``load_from_disk``; ``load_dataset`` would copy it into the cache
    first), anything else goes through ``load_dataset`` (a hub id, a local folder of parquet /
    image files)."""
    from pathlib import Path

    import datasets

    name, task = manifest["dataset"], manifest["task"]
    if (Path(name) / "dataset_dict.json").is_file():
        return _saved_split(datasets.load_from_disk(name), split, f"data.evalsets.{task}", name)
    from webssl_repro.files import hub_access

    try:
        with hub_access(f"data.evalsets.{task}.dataset", name):
            return datasets.load_dataset(name, manifest.get("config"), revision=manifest.get("revision"), split=split)
    except (RuntimeError, ValueError) as err:
        # datasets >= 4: "Dataset scripts are no longer supported"; 2.x / 3.x without
        # trust_remote_code: "... contains custom code ... pass trust_remote_code=True"
        if "scripts are no longer supported" not in str(err) and "trust_remote_code" not in str(err):
            raise
        raise ValueError(
            f"data.evalsets.{task}.dataset: {name} is a hub dataset with a loading script, which datasets "
            f"{datasets.__version__} does not run. Set data.evalsets.{task}.dataset to a copy without one: "
            "a folder written by DatasetDict.save_to_disk (the set with its splits), or a folder or hub repo "
            "of parquet files "
            f"(with data.evalsets.{task}.config / splits to match)") from err


def _saved_split(saved: Any, split: str, key: str, name: str) -> Any:
    """``split`` of a saved DatasetDict, in ``load_dataset``'s split syntax (``validation``,
    ``validation[:1000]``, ``train[:10%]+validation``), which ``load_from_disk`` does not read."""
    import datasets

    if split in saved:
        return saved[split]
    try:
        spec = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as err:
        raise ValueError(f"{key}.splits: {split!r} is not a split of {name} ({err})") from err
    wanted = [part.split("[")[0].strip() for part in split.split("+")]
    missing = [s for s in wanted if s not in saved]
    if missing:
        raise ValueError(f"{key}.dataset: {name} has no split {missing[0]!r} (has {sorted(saved)}); "
                         f"set {key}.splits")
    pieces = [saved[cut.splitname].select(range(cut.from_, cut.to))
              for cut in spec.to_absolute({s: len(saved[s]) for s in saved})]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
