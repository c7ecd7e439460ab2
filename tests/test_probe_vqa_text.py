"""The text-scene VQA diagnostic (benchmarks/probe_vqa_text.py) spells out the facts its questions ask.

Its conclusion, that the mini LM cannot answer even when the scene is written in its input,
rests on the scene text holding the answers: these tests check, per question kind, that the
answer can be read off the text (a sign's word, a count, a depth order, a facing).
"""
from __future__ import annotations

import re

import pytest

import probe_vqa_text as text  # benchmarks/ is on pytest's pythonpath
from webssl_repro.data.vqa_questions import LETTERS


@pytest.fixture(scope="module")
def samples():
    return text.text_samples(text.TRAIN_SEED, 40, with_scene=True)


def _scene(sample) -> list[str]:
    """The scene's entries (objects nearest first, then signs or strings)."""
    scene, _ = sample.question.split("\n", 1)
    return scene.split(" ; ") if scene else []


def _correct(sample) -> str:
    return sample.meta["choices"][LETTERS.index(sample.answer)] if sample.meta.get("choices") else sample.answer


def _entry(entries: list[str], name: str) -> int:
    """Index of the one object entry a question's name ("cup", "red cup") picks out."""
    hits = [i for i, e in enumerate(entries) if " depth " in e and set(name.split()) <= set(e.split())]
    assert len(hits) == 1, (name, entries)
    return hits[0]


def test_read_answers_are_in_the_scene(samples):
    """Signs, chart values and document fields: the answer is one of the scene's words."""
    for benchmark in ("ocrbench", "textvqa", "chartqa", "docvqa"):
        for s in samples[benchmark]:
            words = " ".join(_scene(s)).lower().split()
            assert s.answer.lower() in words, (benchmark, s.question, s.answer)


def test_counts_are_the_scene_objects(samples):
    counted = 0
    for benchmark in ("seed", "cvbench2d"):
        for s in samples[benchmark]:
            if s.question.split("\n")[1] == "How many objects are in the image?":
                assert _correct(s) == str(sum(" depth " in e for e in _scene(s))), s.question
                counted += 1
    assert counted >= 20


def test_depth_order_and_facing(samples):
    """CV-Bench 3D's 'closer to the camera' is the earlier entry (nearest first); MMVP's answer is
    the facing of the object asked about, its turned twin included."""
    closer = 0
    for s in samples["cvbench3d"]:
        m = re.fullmatch(r"Which object is closer to the camera, the (.+) or the (.+)\?", s.question.split("\n")[1])
        if m:
            a, b = m.groups()
            entries = _scene(s)
            nearer = a if _entry(entries, a) < _entry(entries, b) else b
            assert _correct(s) == nearer, (s.question, entries)
            closer += 1
    assert closer >= 10
    for s in samples["mmvp"]:
        obj = re.fullmatch(r"Which direction does the (\w+) (?:face|point)\?", s.question.split("\n")[1]).group(1)
        entries = _scene(s)
        assert f"facing {_correct(s)}" in entries[_entry(entries, obj)], (s.question, entries)
