"""One scorer per VQA benchmark analogue, following each real benchmark's own metric.

``score(benchmark, predictions, references)`` returns a percentage in [0, 100], except
``mme``, which returns MME's perception-style score in [0, 2000]: per subtask MME scores
``acc + acc+`` (acc: % questions right; acc+: % images whose yes *and* no question are
both right; max 200), and MME-P sums 10 subtasks (max 2000). Our MME analogue has fewer
subtasks, so it reports 10 x the mean subtask score; ``category_scores`` then divides by
20 as the paper does, i.e. General gets the mean of (acc + acc+)/2.

A reference is the item dict written by ``webssl_repro.data.evalsets`` (at least
``answer``; ``choices``, ``pair_id``, ``subtask`` where the metric needs them) or a bare
answer string.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

from webssl_repro.metrics import VQA_BENCHMARKS

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
LETTERS = "ABCDEFGH"


def normalize_answer(s: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, number words as digits."""
    s = str(s).lower().strip()
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    s = re.sub(r"[^\w\s.]", " ", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def _ref(r: Any) -> Mapping[str, Any]:
    return r if isinstance(r, Mapping) else {"answer": r}


def parse_yes_no(pred: str) -> str | None:
    w = normalize_answer(pred).split()
    return w[0] if w and w[0] in ("yes", "no") else None


def extract_choice(pred: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a model chose: '(B)', 'B.', 'Answer: B', or the option's text."""
    n = len(choices) if choices else 4
    valid = LETTERS[:n]
    text = str(pred).strip()
    m = re.match(rf"^\(?([{valid}])\)?(?:[.):,\s]|$)", text)
    if m:
        return m.group(1)
    m = re.search(rf"(?:answer|option)\s*(?:is)?\s*:?\s*\(?([{valid}])\)?\b", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    if choices:
        norm = normalize_answer(text)
        hits = [LETTERS[i] for i, c in enumerate(choices) if normalize_answer(c) == norm]
        if len(hits) == 1:
            return hits[0]
    return None


def _to_float(s: str) -> float | None:
    m = re.search(r"-?\d+(?:\.\d+)?", str(s).replace(",", ""))
    return float(m.group(0)) if m else None


def anls(pred: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """DocVQA's Average Normalised Levenshtein Similarity for one question (0 below tau)."""
    p = " ".join(str(pred).lower().split())
    best = 0.0
    for a in answers:
        g = " ".join(str(a).lower().split())
        if not p and not g:
            return 1.0
        prev = list(range(len(g) + 1))
        for i, cp in enumerate(p, 1):
            cur = [i]
            for j, cg in enumerate(g, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (cp != cg)))
            prev = cur
        nl = prev[-1] / max(len(p), len(g))
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


def _answers(r: Mapping[str, Any]) -> list[str]:
    a = r.get("answers") or [r["answer"]]
    return [str(x) for x in a]


def _mean(xs: Sequence[float]) -> float:
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def _check(predictions: Sequence[str], references: Sequence[Any]) -> list[Mapping[str, Any]]:
    if len(predictions) != len(references):
        raise ValueError(f"score: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("score: no references")
    return [_ref(r) for r in references]


def exact_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([float(any(normalize_answer(p) == normalize_answer(a) for a in _answers(r)))
                  for p, r in zip(predictions, refs)])


def multiple_choice(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([float(extract_choice(p, r.get("choices")) == str(r["answer"]).strip("()").upper())
                  for p, r in zip(predictions, refs)])


def mc_by_subtask(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """CV-Bench: accuracy per subtask (e.g. count / relation), then the mean of subtasks."""
    refs = _check(predictions, references)
    groups: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(predictions, refs):
        groups[str(r.get("subtask", ""))].append(float(extract_choice(p, r.get("choices")) == str(r["answer"]).upper()))
    return sum(_mean(v) for v in groups.values()) / len(groups)


def mc_pairs(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """MMVP: a pair of near-identical images counts only if both questions are right."""
    refs = _check(predictions, references)
    pairs: dict[str, list[bool]] = defaultdict(list)
    for k, (p, r) in enumerate(zip(predictions, refs)):
        pairs[str(r.get("pair_id", k))].append(extract_choice(p, r.get("choices")) == str(r["answer"]).upper())
    return _mean([float(all(v)) for v in pairs.values()])


def numeric(predictions: Sequence[str], references: Sequence[Any], rel_tol: float = 0.0) -> float:
    """Number match (MathVista-style); ``rel_tol`` > 0 gives ChartQA's relaxed accuracy."""
    refs = _check(predictions, references)
    hits = []
    for p, r in zip(predictions, refs):
        g, v = _to_float(str(r["answer"])), _to_float(p)
        if g is None:  # non-numeric answer: exact match
            hits.append(float(normalize_answer(p) == normalize_answer(str(r["answer"]))))
        else:
            hits.append(float(v is not None and abs(v - g) <= rel_tol * abs(g) + 1e-9))
    return _mean(hits)


def relaxed_accuracy(predictions: Sequence[str], references: Sequence[Any]) -> float:
    return numeric(predictions, references, rel_tol=0.05)


def contains_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """OCRBench: right when the ground-truth string occurs in the answer (case-insensitive)."""
    refs = _check(predictions, references)
    return _mean([float(any(a.lower().strip() in str(p).lower() for a in _answers(r))) for p, r in zip(predictions, refs)])


def mean_anls(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([anls(p, _answers(r)) for p, r in zip(predictions, refs)])


def mme_score(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for k, (p, r) in enumerate(zip(predictions, refs)):
        ok = parse_yes_no(p) == normalize_answer(str(r["answer"]))
        by_task[str(r.get("subtask", ""))][str(r.get("pair_id", k))].append(ok)
    subtask_scores = []
    for images in by_task.values():
        answers = [ok for v in images.values() for ok in v]
        acc = _mean([float(x) for x in answers])
        acc_plus = _mean([float(all(v)) for v in images.values()])
        subtask_scores.append(acc + acc_plus)
    return 10.0 * sum(subtask_scores) / len(subtask_scores)


SCORERS: dict[str, Callable[[Sequence[str], Sequence[Any]], float]] = {
    "mme": mme_score, "mmbench": multiple_choice, "seed": multiple_choice, "gqa": exact_match,
    "sqa": multiple_choice, "mmmu": multiple_choice, "mathvista": numeric, "ai2d": multiple_choice,
    "chartqa": relaxed_accuracy, "ocrbench": contains_match, "textvqa": exact_match, "docvqa": mean_anls,
    "mmvp": mc_pairs, "realworldqa": multiple_choice, "cvbench2d": mc_by_subtask, "cvbench3d": mc_by_subtask,
}
assert set(SCORERS) == set(VQA_BENCHMARKS)


def score(benchmark: str, predictions: Sequence[str], references: Sequence[Any]) -> float:
    if benchmark not in SCORERS:
        raise KeyError(f"score: unknown benchmark {benchmark!r}; known {list(SCORERS)}")
    return float(SCORERS[benchmark](predictions, references))
