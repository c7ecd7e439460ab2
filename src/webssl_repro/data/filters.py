"""Light / heavy text filters (paper §4, App. A, Fig. 8) behind one ``TextFilter`` interface.

The paper asks SmolVLM2 one of two prompts per image and keeps it on "yes"; ``LIGHT_PROMPT``
and ``HEAVY_PROMPT`` are verbatim. Backends:

- ``ocr`` (mini default, offline): RapidOCR (ONNX, weights ship with the wheel) reads the
  image; a *text line* is a detected box whose recognised string has confidence >=
  ``min_score`` (0.8) and at least one letter or digit; its *words* are its
  whitespace-separated tokens.
  light = at least one text line with >= ``min_chars`` (2) letters/digits ("contains
  readable text"; single glyphs are what OCR hallucinates on shapes and textures).
  heavy = light, and >= ``heavy_min_words`` (5) words or >= ``heavy_min_lines`` (4) lines: charts (title,
  axis labels, values), tables and documents are text-dense, while a photo with signs has a
  word or three. Measured on the mini-web at 256 px: text scenes read 1-3 words, charts and
  documents 6 or more, so both thresholds sit in the gap; the rule's precision/recall is
  reported per run by ``filter_report``, not assumed.
  Reading a 64-px image is unreliable for any OCR, so mini-web samples are re-rendered
  from their metadata at ``ocr_size`` (256 px) - the same image, drawn larger - and other
  images are upscaled (bicubic) to that size.
- ``mllm`` (paper scale): see ``webssl_repro.data.filter_mllm``.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from webssl_repro.data.shards import sample_id
from webssl_repro.data.loader import STATS_KEY, shard_batches
from webssl_repro.files import package_version

LIGHT_PROMPT = "Does this image contain any readable text? Answer only yes or no."
HEAVY_PROMPT = ("Please think carefully before answering. Does this image contain charts, tables, or documents "
                "with readable text? Answer only yes or no.")
PROMPTS: dict[str, str] = {"light": LIGHT_PROMPT, "heavy": HEAVY_PROMPT}
# Ground truth of the world each variant aims at.
TRUTH_KEYS: dict[str, str] = {"light": "has_text", "heavy": "is_chart_table_doc"}


class TextFilter(abc.ABC):
    """Decides keep/drop per image for the ``light`` and ``heavy`` variants."""

    name: str = "base"
    batch_size: int = 16  # images per decision call, and per loader batch (filter_corpus)
    off_topic: int = 0  # decisions on an answer that was neither yes nor no (an MLLM's), dropped as a no

    @abc.abstractmethod
    def decide(self, images: Sequence[Image.Image], variants: Sequence[str] = ("light", "heavy")) -> dict[str, list[bool]]:
        """One keep flag per image and variant."""

    def prepare(self, sample: Mapping[str, Any]) -> Image.Image:
        """The image this backend should look at for a loaded sample (default: as stored)."""
        return sample["image"]

    def encode(self, images: Sequence[Image.Image], variants: Sequence[str]) -> Any:
        """The CPU work on a batch of prepared images that can run in a loader worker
        (``filter_batch``), for ``decide_encoded`` to finish. Default: none."""
        return list(images)

    def decide_encoded(self, encoded: Any, variants: Sequence[str]) -> dict[str, list[bool]]:
        """``decide`` on what ``encode`` made."""
        return self.decide(encoded, variants)


@dataclasses.dataclass
class FilterBatch:
    """A loader batch as ``run_filter`` takes it: each sample's id, where it is stored (shard,
    key, position in the shard), its ground truth where the metadata has it, the backend's ``encode``d images, and
    the final counts of any reader that ended in this batch (``loader.STATS_KEY`` items)."""

    ids: list[str]
    sources: list[tuple[str, str, int]]
    truth: dict[str, list[bool]] | None
    encoded: Any
    reader_stats: list[dict[str, Any]]


def filter_batch(flt: TextFilter, variants: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> FilterBatch:
    """Collate loaded samples for ``run_filter``: in a DataLoader worker when the loader has
    workers, so that the backend's CPU side (the MLLM's image processor) runs beside its GPU."""
    stats = [s[STATS_KEY] for s in samples if STATS_KEY in s]
    samples = [s for s in samples if STATS_KEY not in s]
    metas = [s.get("meta") or {} for s in samples]
    known = all(TRUTH_KEYS[v] in m for v in variants for m in metas)
    return FilterBatch(
        ids=[sample_id(s) for s in samples],
        sources=[(str(s.get("__url__")), str(s.get("__key__")), int(s.get("__index__", 0))) for s in samples],
        truth={v: [bool(m[TRUTH_KEYS[v]]) for m in metas] for v in variants} if known else None,
        encoded=flt.encode([flt.prepare(s) for s in samples], variants) if samples else None,
        reader_stats=stats)


def _check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in PROMPTS]
    if unknown:
        raise KeyError(f"unknown filter variant(s) {unknown}; known {list(PROMPTS)}")


#: what ``OCRFilter``'s cache file holds: every line the engine read, under the engine's setup
OCR_CACHE_FORMAT = "ocr-lines-2"


class OCRFilter(TextFilter):
    """RapidOCR rule-based filter; one OCR pass serves both variants."""

    name = "ocr"

    def __init__(self, min_score: float = 0.8, min_chars: int = 2, heavy_min_words: int = 5, heavy_min_lines: int = 4,
                 ocr_size: int = 256, rerender: bool = True, threads: int | None = None,
                 cache_path: str | None = None) -> None:
        from rapidocr_onnxruntime import RapidOCR

        kw: dict[str, Any] = {"det_limit_side_len": ocr_size, "det_limit_type": "min", "use_cls": False}
        if threads:
            kw["intra_op_num_threads"] = int(threads)
        self.engine = RapidOCR(**kw)
        self.min_score, self.min_chars = min_score, min_chars
        self.heavy_min_words, self.heavy_min_lines = heavy_min_words, heavy_min_lines
        self.ocr_size, self.rerender = ocr_size, rerender
        # The engine's every line, keyed by a hash of the pixels read: the light and heavy rules
        # (separate workflow jobs) share one OCR pass, the slow part, through this file, and
        # the thresholds apply on reading it, so a changed min_score is not answered from reads
        # cut at the old one. Reads of another engine setup are not reused.
        self.engine_setup = {**{k: v for k, v in kw.items() if k != "intra_op_num_threads"},
                             "rapidocr_onnxruntime": package_version("rapidocr_onnxruntime")}
        self.cache_path = cache_path
        self.cache: dict[str, list[tuple[str, float]]] = {}
        if cache_path and os.path.exists(cache_path):
            self.cache = self._load_cache(cache_path)

    def _load_cache(self, path: str) -> dict[str, list[tuple[str, float]]]:
        """The reads saved in ``path``; none, with a warning, where they are unreadable or of
        another format or engine setup (derived data: read again, saved whole)."""
        try:
            with open(path) as fh:
                saved = json.load(fh)
            if not isinstance(saved, dict) or saved.get("format") != OCR_CACHE_FORMAT:
                raise ValueError(f"not format {OCR_CACHE_FORMAT} (an earlier version kept only the lines above "
                                 "its min_score)")
            if saved.get("engine") != self.engine_setup:
                raise ValueError(f"read with {saved.get('engine')}, not {self.engine_setup}")
            return {k: [(str(t), float(c)) for t, c in v] for k, v in saved["reads"].items()}
        except (ValueError, AttributeError, TypeError, KeyError) as err:
            warnings.warn(f"OCR cache {path} is unusable ({err}); reading the images again", RuntimeWarning)
            return {}

    def save_cache(self) -> None:
        if self.cache_path:
            from webssl_repro.files import write_json

            write_json(self.cache_path, {"format": OCR_CACHE_FORMAT, "engine": self.engine_setup,
                                         "reads": self.cache})

    def prepare(self, sample: Mapping[str, Any]) -> Image.Image:
        meta = sample.get("meta") or {}
        if self.rerender and "background" in meta and "seed" in meta:
            from webssl_repro.data.miniweb import MiniWebConfig, render

            return render(meta, self.ocr_size, float(meta.get("noise", MiniWebConfig().noise)))[0]
        img = sample["image"]
        if min(img.size) < self.ocr_size:
            scale = self.ocr_size / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        return img

    def read(self, image: Image.Image) -> list[tuple[str, float]]:
        """The text lines this filter believes: (string, confidence) of at least ``min_score``,
        with a letter or digit."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        key = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self._ocr(pixels)
        return [(t, c) for t, c in self.cache[key] if c >= self.min_score and re.search(r"[A-Za-z0-9]", t)]

    def _ocr(self, pixels: np.ndarray) -> list[tuple[str, float]]:
        """Every line the engine reads: (string, confidence)."""
        result, _ = self.engine(pixels, use_cls=False)
        return [(str(text), float(conf)) for _box, text, conf in result or []]

    def decide(self, images: Sequence[Image.Image], variants: Sequence[str] = ("light", "heavy")) -> dict[str, list[bool]]:
        _check_variants(variants)
        out: dict[str, list[bool]] = {v: [] for v in variants}
        for im in images:
            lines = [t for t, _ in self.read(im)]
            words = [w for t in lines for w in t.split() if re.search(r"[A-Za-z0-9]", w)]
            light = any(len(re.findall(r"[A-Za-z0-9]", t)) >= self.min_chars for t in lines)
            # the heavy-filtered data is a part of the light: text-dense images are images with text
            keep = {"light": light,
                    "heavy": light and (len(words) >= self.heavy_min_words or len(lines) >= self.heavy_min_lines)}
            for v in variants:
                out[v].append(keep[v])
        return out


def backend_class(backend: str) -> type[TextFilter]:
    if backend == "ocr":
        return OCRFilter
    if backend == "mllm":
        from webssl_repro.data.filter_mllm import MLLMFilter

        return MLLMFilter
    raise KeyError(f"data.filter.backend: unknown backend {backend!r} (ocr | mllm)")


#: data.filter keys of the filter job itself, not of a backend's constructor
JOB_KEYS = ("backend", "parts", "workers", "checkpoint_shards")


def backend_options(backend: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """``data.filter``'s options for ``backend``'s constructor. A null value is dropped: config
    overlays merge, so switching backends over config/paper.yaml keeps the MLLM's ``model``,
    ``device``, ``dtype``, and null is how an overlay unsets them. A set option the backend does
    not take is an error naming it, before any job runs (``Plan``) and in the job itself."""
    import inspect

    taken = set(inspect.signature(backend_class(backend).__init__).parameters) - {"self", "generate_fn"}
    options = {k: v for k, v in section.items() if k not in JOB_KEYS and v is not None}
    foreign = sorted(k for k in options if k not in taken)
    if foreign:
        verb = "is not an option" if len(foreign) == 1 else "are not options"
        raise ValueError(f"data.filter: {', '.join(foreign)} {verb} of backend {backend!r} (it takes "
                         f"{', '.join(sorted(taken))}); an overlay that switches backends sets them to null")
    return options


def make_filter(backend: str, **kw: Any) -> TextFilter:
    return backend_class(backend)(**backend_options(backend, kw))


def run_filter(flt: TextFilter, samples: Iterable[Mapping[str, Any]], variants: Sequence[str] = ("light", "heavy"),
               batch_size: int | None = None) -> dict[str, Any]:
    """Decisions for a stream of loaded samples, batched here (``batch_size``: the backend's)
    within each shard, as a loader's workers batch them (``loader.shard_batches``; samples of an
    image folder, each its own ``__url__``, would be decided one by one); ``truth`` is None
    unless every sample's metadata has it."""
    size = int(batch_size or flt.batch_size)
    batches = (filter_batch(flt, variants, chunk) for chunk in shard_batches(samples, size))
    return run_filter_batches(flt, batches, variants)


def run_filter_batches(flt: TextFilter, batches: Iterable[FilterBatch],
                       variants: Sequence[str] = ("light", "heavy")) -> dict[str, Any]:
    """Decisions for ``filter_batch``es (made here, or by a loader's workers). ``seconds`` is the
    wall time of the whole pass, reading included; ``cpu_seconds`` this process's CPU time;
    ``loader_stats`` the summed counts of the readers that reported theirs (``STATS_KEY``);
    ``off_topic`` the decisions of these batches made on an answer neither yes nor no."""
    _check_variants(variants)
    ids: list[str] = []
    sources: list[tuple[str, str, int]] = []  # (shard, key, position): where a kept sample is copied from
    truth: dict[str, list[bool]] | None = {v: [] for v in variants}
    decisions: dict[str, list[bool]] = {v: [] for v in variants}
    readers: list[dict[str, Any]] = []
    t0, cpu0, off_topic = time.perf_counter(), time.process_time(), flt.off_topic
    for batch in batches:
        readers.extend(batch.reader_stats)
        if not batch.ids:
            continue
        out = flt.decide_encoded(batch.encoded, variants)
        ids.extend(batch.ids)
        sources.extend(batch.sources)
        for v in variants:
            if len(out[v]) != len(batch.ids):
                raise RuntimeError(f"{flt.name} filter: {len(out[v])} {v} decisions for {len(batch.ids)} images")
            decisions[v].extend(out[v])
            if truth is not None and batch.truth is not None:
                truth[v].extend(batch.truth[v])
        if batch.truth is None:
            truth = None
    seconds = time.perf_counter() - t0
    loader_stats = ({k: sum(int(r[k]) for r in readers) for k in ("samples", "skipped_samples", "broken_shards")}
                    if readers else None)
    return {"ids": ids, "sources": sources, "decisions": decisions, "truth": truth,
            "seconds": seconds, "cpu_seconds": time.process_time() - cpu0,
            "images_per_second": len(ids) / seconds if seconds > 0 else float("inf"), "backend": flt.name,
            "loader_stats": loader_stats, "off_topic": flt.off_topic - off_topic}


def filter_report(ids: Sequence[str], decisions: Mapping[str, Sequence[bool]],
                  truth: Mapping[str, Sequence[bool]] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: kept ids, kept fraction and, given ground truth, precision / recall / F1."""
    out: dict[str, dict[str, Any]] = {}
    for v, keep in decisions.items():
        keep_a = np.asarray(keep, bool)
        rep: dict[str, Any] = {"prompt": PROMPTS[v], "n": len(ids), "kept_ids": [i for i, k in zip(ids, keep_a) if k],
                               "kept_fraction": float(keep_a.mean()) if len(keep_a) else 0.0}
        if truth is not None and v in truth:
            t = np.asarray(truth[v], bool)
            tp, fp, fn = int((keep_a & t).sum()), int((keep_a & ~t).sum()), int((~keep_a & t).sum())
            rep.update(true_fraction=float(t.mean()), **confusion_scores(tp, fp, fn))
        out[v] = rep
    return out


def _total(counts: Iterable[int | None]) -> int | None:
    """A count summed over parts, None (not counted) where a part has none."""
    counts = list(counts)
    return None if any(c is None for c in counts) else sum(int(c) for c in counts)


def confusion_scores(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if tp else 0.0}


def merge_reports(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One filter report from the reports of disjoint parts of a corpus (``filter_report``'s
    counts plus speed and loader counts, without id lists): what one job over all of it would
    have written, with the throughput of one worker (images over the summed part times)."""
    if not parts:
        raise ValueError("merge_reports: no parts")
    n = sum(int(p["n"]) for p in parts)
    kept = sum(int(p["n_kept"]) for p in parts)
    seconds = sum(int(p["n"]) / p["images_per_second"] for p in parts if p["images_per_second"])
    out = {**{k: parts[0][k] for k in ("variant", "backend", "prompt")},
           "n": n, "n_kept": kept, "kept_fraction": kept / n if n else 0.0,
           "images_per_second": n / seconds if seconds else 0.0,
           **{k: sum(p[k] for p in parts) for k in ("cpu_seconds", "skipped_samples", "broken_shards")},
           "off_topic": _total(p.get("off_topic") for p in parts)}
    if all("tp" in p for p in parts):
        out["true_fraction"] = sum(p["true_fraction"] * int(p["n"]) for p in parts) / n if n else 0.0
        out.update(confusion_scores(*(sum(int(p[k]) for p in parts) for k in ("tp", "fp", "fn"))))
    return out


def sample_grid(raw: Sequence[Image.Image], light: Sequence[Image.Image], heavy: Sequence[Image.Image],
                out_prefix: str, per_row: int = 8) -> list[str]:
    """Fig. 8 analogue: rows of random raw images, light-kept and heavy-kept images; PDF + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("Raw", raw), ("Light filter", light), ("Heavy filter", heavy)]
    fig, axes = plt.subplots(3, per_row, figsize=(per_row * 1.2, 3 * 1.35), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c])
        axes[r][0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    paths = [f"{out_prefix}.pdf", f"{out_prefix}.png"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths

