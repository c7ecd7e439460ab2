"""The mini-web: a seeded procedural world of web-like images with full ground truth (design §4).

``generate(seed, index, cfg)`` draws one image with metadata, mask and depth; the spec
(``sample_spec``) is resolution-free, so ``render(spec, size)`` redraws the same image at
any size (the OCR filter reads a larger render of the same image).
"""
from webssl_repro.data.miniweb.generate import Sample, generate, render
from webssl_repro.data.miniweb.layout import pick_kind, sample_spec
from webssl_repro.data.miniweb.world import (
    CATEGORIES, COLOUR_NAMES, COLOURS, KINDS, KNOWLEDGE, OBJECT_CLASSES, SEG_CLASSES, SEG_ID, TEXTURES, WORDS,
    MiniWebConfig, rng_for, sample_id,
)

__all__ = [
    "CATEGORIES", "COLOUR_NAMES", "COLOURS", "KINDS", "KNOWLEDGE", "OBJECT_CLASSES", "SEG_CLASSES", "SEG_ID",
    "TEXTURES", "WORDS", "MiniWebConfig", "Sample", "generate", "pick_kind", "render", "rng_for", "sample_id",
    "sample_spec",
]
