"""Paper-scale data of the ``vqa`` stage, chosen by ``evaluate.vqa.data`` in the config.

Stage 1 reads Cambrian-Alignment, stage 2 Cambrian-7M (LAION-sourced rows dropped, as the
paper does), and the scores come from the 16 real benchmarks through
``real.load_benchmark``. Every dataset id, config name, split, local path and sample cap
comes from the config; what the config leaves out falls back to ``real.CAMBRIAN`` and
``real.BENCHMARKS``. A benchmark ``path`` may be a hub id or a local directory (a
``save_to_disk`` output or a local copy of the hub files), so a cluster without internet
access, or a test, points the stage at local copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from webssl_repro.config import check_keys
from webssl_repro.evaluate.vqa.data import VqaSample
from webssl_repro.metrics import VQA_BENCHMARKS

SOURCE_KEYS = {"repo", "file", "local_dir", "image_root", "limit"}
BENCHMARK_KEYS = {"path", "name", "split", "limit", "images"}
DATA_KEYS = {"alignment", "instruction", "exclude_laion", "benchmark_limit", "benchmarks"}
BENCH_PREFIX = "bench:"  # benchmark image ids, kept apart from Cambrian's relative image paths
#: Cambrian images opened before training, spread over each set: a wrong ``image_root`` or an
#: incomplete extraction stops the job here, not inside stage 1 after the LM loaded.
SPOT_CHECK = 64


@dataclass
class PaperData:
    alignment: list[VqaSample]
    instruction: list[VqaSample]
    tests: dict[str, list[VqaSample]]
    load_image: Callable[[str], Any]
    counts: dict[str, Any] = field(default_factory=dict)


def _check(section: Mapping[str, Any], known: set[str], where: str) -> None:
    check_keys(section, known, f"evaluate.vqa.{where}")


def _limit(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def laion_markers(value: Any) -> tuple[str, ...]:
    """``evaluate.vqa.data.exclude_laion``: true (rows marked "laion"), false, or the markers."""
    from webssl_repro.evaluate.vqa.real import LAION_MARKERS

    if isinstance(value, bool):
        return LAION_MARKERS if value else ()
    if isinstance(value, (list, tuple)) and all(isinstance(m, str) and m for m in value):
        return tuple(value)
    raise ValueError(f"evaluate.vqa.data.exclude_laion: {value!r} is not true, false or a list of non-empty strings "
                     "(what marks a LAION image's path, source or id)")


def cambrian(kind: str, section: Mapping[str, Any], markers: tuple[str, ...],
             excluded: Optional[list[int]] = None) -> list[VqaSample]:
    """Cambrian ``kind`` (alignment | instruction) as samples; ``limit`` caps them after the LAION
    filter, whose dropped rows (of those read) are counted in ``excluded[0]``."""
    from webssl_repro.evaluate.vqa.real import cambrian_path, cambrian_samples

    _check(section, SOURCE_KEYS, f"data.{kind}")
    root = section.get("image_root")
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"evaluate.vqa.data.{kind}.image_root: {root} is not a directory")
    path = cambrian_path(kind, section.get("local_dir"), repo=section.get("repo"), filename=section.get("file"))
    samples = list(islice(cambrian_samples(path, laion_markers=markers, image_root=root, excluded=excluded),
                          _limit(section.get("limit"))))
    spot_check_images(samples, kind, root)
    return samples


def spot_check_images(samples: list[VqaSample], kind: str, root: Optional[str], n: int = SPOT_CHECK) -> None:
    """Open ``n`` of the set's images, evenly spaced, and name those that do not decode."""
    from webssl_repro.evaluate.vqa.real import open_image

    with_image = [s.image_id for s in samples if s.image_id is not None]
    picked = [with_image[k * len(with_image) // n] for k in range(n)] if len(with_image) > n else with_image
    failed = []
    for image_id in dict.fromkeys(picked):
        try:
            open_image(image_id)
        except Exception as err:  # noqa: BLE001 - any failure to decode is reported, by file
            failed.append(f"{image_id} ({type(err).__name__})")
    if failed:
        where = f"image_root {root}" if root is not None else "no image_root (paths relative to the job's directory)"
        raise ValueError(f"evaluate.vqa.data.{kind}: {len(failed)} of {len(set(picked))} images checked (of "
                         f"{len(with_image)}) do not open with {where}: {', '.join(failed[:5])}"
                         + (", ..." if len(failed) > 5 else ""))


def benchmark(name: str, section: Mapping[str, Any], default_limit: Optional[int]
              ) -> tuple[list[VqaSample], Callable[[str], Any]]:
    """One real benchmark from its configured source (hub id or local directory)."""
    from webssl_repro.evaluate.vqa.real import BENCHMARKS, GQA_IMAGES, load_benchmark, open_dataset

    _check(section, BENCHMARK_KEYS, f"data.benchmarks.{name}")
    spec = BENCHMARKS[name]
    dataset = open_dataset(section.get("path", spec.path), section.get("name", spec.name),
                           section.get("split", spec.split))
    images = None
    if name == "gqa":
        src = {**dict(zip(("path", "name", "split"), GQA_IMAGES)), **dict(section.get("images") or {})}
        _check(src, {"path", "name", "split"}, "data.benchmarks.gqa.images")
        images = open_dataset(src["path"], src["name"], src["split"])
    elif section.get("images") is not None:
        raise KeyError(f"evaluate.vqa.data.benchmarks.{name}: 'images' is for gqa only")
    limit = _limit(section["limit"]) if "limit" in section else default_limit
    return load_benchmark(name, dataset=dataset, images=images, limit=limit)


#: What a job reads of the paper-scale data: the probe's training (``vqa_probe``), the
#: benchmarks it answers (``vqa``), or both (``stage.run_vqa``, one process).
PARTS = ("train", "test", "all")


def load_paper_data(data: Optional[Mapping[str, Any]], part: str = "all") -> PaperData:
    """Cambrian stage-1/stage-2 samples, the 16 benchmarks' test samples and one image loader;
    ``part`` ``train`` reads Cambrian only, ``test`` the benchmarks only.

    Benchmark image ids become ``bench:<name>/<row>``; Cambrian image ids are file paths
    (under ``image_root``) opened with PIL; text-only Cambrian rows keep ``image_id=None``.
    """
    from webssl_repro.evaluate.vqa.real import open_image

    if part not in PARTS:
        raise ValueError(f"load_paper_data: part {part!r} is not one of {PARTS}")
    data = dict(data or {})
    _check(data, DATA_KEYS, "data")
    counts: dict[str, Any] = {}
    alignment: list[VqaSample] = []
    instruction: list[VqaSample] = []
    if part != "test":
        markers = laion_markers(data.get("exclude_laion", True))
        excluded = {"alignment": [0], "instruction": [0]}
        alignment = cambrian("alignment", data.get("alignment") or {}, markers, excluded["alignment"])
        instruction = cambrian("instruction", data.get("instruction") or {}, markers, excluded["instruction"])
        if not alignment or not instruction:
            raise ValueError(f"vqa: empty Cambrian data (alignment {len(alignment)}, instruction {len(instruction)})")
        counts.update({"alignment": len(alignment), "instruction": len(instruction), "exclude_laion": bool(markers),
                       "laion_markers": list(markers), "laion_excluded": {k: n[0] for k, n in excluded.items()}})
    configured = dict(data.get("benchmarks") or {})
    _check(configured, set(VQA_BENCHMARKS), "data.benchmarks")
    default_limit = _limit(data.get("benchmark_limit"))
    tests: dict[str, list[VqaSample]] = {}
    getters: dict[str, Callable[[str], Any]] = {}
    for name in VQA_BENCHMARKS if part != "train" else ():
        samples, getters[name] = benchmark(name, configured.get(name) or {}, default_limit)
        if not samples:
            raise ValueError(f"vqa: benchmark {name} has no samples")
        for s in samples:
            s.image_id = BENCH_PREFIX + str(s.image_id)
        tests[name] = samples
    if tests:
        counts["benchmarks"] = {b: len(v) for b, v in tests.items()}

    def load_image(image_id: str) -> Any:
        if image_id.startswith(BENCH_PREFIX):
            inner = image_id[len(BENCH_PREFIX):]
            return getters[inner.split("/", 1)[0]](inner)
        return open_image(image_id)

    return PaperData(alignment, instruction, tests, load_image, counts)
