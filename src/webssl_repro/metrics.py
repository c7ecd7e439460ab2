"""The metric vocabulary shared by evaluations, published numbers and renderers.

Keys are lower-case benchmark ids (``mme`` … ``cvbench3d``); category names are the
paper's own (``OCR & Chart``). Classic-vision keys name dataset and protocol.
"""
from __future__ import annotations

VQA_CATEGORIES: dict[str, tuple[str, ...]] = {
    "General": ("mme", "mmbench", "seed", "gqa"),
    "Knowledge": ("sqa", "mmmu", "mathvista", "ai2d"),
    "OCR & Chart": ("chartqa", "ocrbench", "textvqa", "docvqa"),
    "Vision-Centric": ("mmvp", "realworldqa", "cvbench2d", "cvbench3d"),
}
VQA_BENCHMARKS: tuple[str, ...] = tuple(b for group in VQA_CATEGORIES.values() for b in group)
CATEGORY_COLUMNS: tuple[str, ...] = ("Average", *VQA_CATEGORIES)
# Where this project's data, scoring or protocol is not the paper's (evaluate/vqa/real.py,
# evaluate/linear.py): said beside every comparison of a number that includes the benchmark.
PROTOCOL_DIFFERENCES: dict[str, str] = {
    "docvqa": "DocVQA is scored here by a local ANLS on its validation split; the paper's is the "
              "evaluation server's on the test split",
    "mmvp": "MMVP is lmms-lab-eval/MMVP, which corrects two question pairs that Cambrian's copy mislabels",
    "in1k_linear": "The IN-1k linear probe trains here on features computed once from the eval view "
                   "(resize + centre crop); DINOv2's protocol crops and flips each training batch anew",
}
# The VQA probe's control encoders (evaluate.vqa.controls): raw-pixel tokens, and the same zeroed.
VQA_CONTROLS: tuple[str, ...] = ("pixels", "blind")
BLIND = "blind"  # the zeroed one: the language model's answers without the image

# As the appendix tables print them.
BENCHMARK_LABELS: dict[str, str] = {
    "mme": "MME^P", "mmbench": "MMB", "seed": "SEED^I", "gqa": "GQA",
    "sqa": "SQA^I", "mmmu": "MMMU^V", "mathvista": "MathVista^M", "ai2d": "AI2D",
    "chartqa": "ChartQA", "ocrbench": "OCRBench", "textvqa": "TextVQA", "docvqa": "DocVQA",
    "mmvp": "MMVP", "realworldqa": "RealWorldQA", "cvbench2d": "CV-Bench^2D", "cvbench3d": "CV-Bench^3D",
}

CLASSIC_METRICS: tuple[str, ...] = ("in1k_linear", "ade20k_linear", "ade20k_ms", "nyud_lin1", "nyud_lin4")
CLASSIC_LABELS: dict[str, str] = {
    "in1k_linear": "IN-1k lin. (top-1)",
    "ade20k_linear": "ADE20K lin. (mIoU)",
    "ade20k_ms": "ADE20K +ms (mIoU)",
    "nyud_lin1": "NYUd lin.1 (RMSE)",
    "nyud_lin4": "NYUd lin.4 (RMSE)",
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"nyud_lin1", "nyud_lin4"})
# The best answer to each classic task that ignores the image (evaluate.no_image): its source
# name in results frames and its folder under results/{scale}/controls/. The VQA probe on zero
# image tokens (``BLIND``) is the same source in results frames, with the VQA metrics.
NO_IMAGE = "no_image"
NO_IMAGE_RESULTS: frozenset[tuple[str, str]] = frozenset({(NO_IMAGE, "classic.json"), (BLIND, "vqa.json")})


def better(metric: str, value: float, reference: float) -> bool:
    """Whether ``value`` is strictly better than ``reference`` in ``metric``'s direction."""
    return value < reference if metric in LOWER_IS_BETTER else value > reference

# Share of the pretraining data a run's data label keeps (Table 2's "% of MC-2B").
DATA_PCT = "data_pct"
ALIGNMENT_PREFIX = "alignment/"
# A score's standard error over its samples, where the evaluation measures one ("se/alignment/minilm").
SE_PREFIX = "se/"


def label(metric: str) -> str:
    if metric in BENCHMARK_LABELS:
        return BENCHMARK_LABELS[metric]
    if metric in CLASSIC_LABELS:
        return CLASSIC_LABELS[metric]
    if metric == DATA_PCT:
        return "% of data"
    if metric.startswith(ALIGNMENT_PREFIX):
        return f"alignment ({metric[len(ALIGNMENT_PREFIX):]})"
    return metric
