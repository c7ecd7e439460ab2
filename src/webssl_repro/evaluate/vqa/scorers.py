"""One scorer per VQA benchmark, as Cambrian-1's eval scripts score it (``eval/eval/<b>/<b>_test.py``,
the protocol the paper follows), for the real benchmarks and their mini analogues alike.

``score(benchmark, predictions, references)`` returns a percentage in [0, 100], except
``mme``, which returns MME's perception-style score in [0, 2000]: per subtask MME scores
``acc + acc+`` (acc: % questions right; acc+: % images whose yes *and* no question are
both right; max 200), and MME-P sums 10 subtasks (max 2000). Our MME analogue has fewer
subtasks, so it reports 10 x the mean subtask score; ``category_scores`` then divides by
20 as the paper does, i.e. General gets the mean of (acc + acc+)/2.

Answers are read as Cambrian reads them (``single_answer``, ``option_letter``): lower case, the
text after "answer is" / "answer:", trailing punctuation off; a multiple-choice answer is its
first character. Per benchmark: exact match (MME, GQA), the option letter (MMBench, circular
over a question's option shifts; SEED, AI2D, CV-Bench by source; MMMU's and ScienceQA's
choices, the latter also by the option's text), MMVP pairs (letter or option text), MathVista
(exact, or within 5 % of the answer when both are numbers), ChartQA (within 5 % when both parse as numbers),
OCRBench (the answer contains a ground truth; handwritten maths with spaces removed, case kept),
TextVQA (VQA accuracy over its 10 annotators), DocVQA (ANLS), RealWorldQA (the first word).

A reference is the item dict written by ``webssl_repro.data.evalsets`` or ``vqa.real`` (at
least ``answer``; ``choices``, ``answers``, ``pair_id``, ``subtask``, ``circular_id`` where
the metric needs them) or a bare answer string.
"""
from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

from webssl_repro.metrics import VQA_BENCHMARKS

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
#: EvalAI's punctuation: a mark becomes a space (``red-blue``: ``red blue``), or is dropped where
#: one of its kind stands beside a space (``hello !``); others (``% # & : *``, the apostrophe)
#: stay. A period is dropped unless a digit follows (``u.s.a.``: ``usa``; ``3.5`` stays).
_PUNCTUATION = ';/[]"{}()=+\\_-><@`!'
_PERIOD = re.compile(r"\.(?!\d)")
#: The contractions EvalAI's processor restores (lower case: its capitalised ``I'm`` entries
#: never match a lower-cased answer); each is also written with one of its apostrophes left out.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've
    might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
    something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
    they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
    who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
    y'all'd've you'd you'd've you'll you're you've""".split()
#: written without one apostrophe -> the contraction (``let's`` and ``she's`` only as themselves)
_RESTORE = {word[:i] + word[i + 1:]: word for word in _CONTRACTIONS if word not in ("let's", "she's")
            for i, c in enumerate(word) if c == "'"}
LETTERS = "ABCDEFGH"
#: Cambrian's answer markers, split on in this order (the text after the last one is kept)
ANSWER_KEYWORDS = ("answer is", "answer is:", "answer:")
#: OCRBench's category whose answers compare without spaces and with case (LaTeX formulas)
HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"


def normalize_answer(s: str) -> str:
    """TextVQA's answer normalisation (EvalAI's answer processor, which Cambrian's M4C evaluator
    applies to predictions and annotations alike): lower case; commas and question marks
    dropped, "'s" split off; punctuation (``_PUNCTUATION``) removed or spaced; periods dropped
    unless before a digit; number words as digits ("none" is 0); articles dropped; contractions
    written without an apostrophe restored."""
    s = str(s).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    text = s
    for mark in _PUNCTUATION:
        s = s.replace(mark, "" if f"{mark} " in text or f" {mark}" in text else " ")
    s = _PERIOD.sub("", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(_RESTORE.get(w, w) for w in words if w not in _ARTICLES)


def single_answer(text: str) -> str:
    """Cambrian's ``extract_single_answer``: lower case, after the answer markers, trailing '.' off."""
    text = str(text).lower().strip()
    for keyword in ANSWER_KEYWORDS:
        if keyword in text:
            text = text.split(keyword)[-1]
    return text.strip().rstrip(".")


def option_text(text: str) -> str:
    """``single_answer`` without trailing '.:,' and surrounding parentheses (Cambrian's MCQ reading)."""
    return single_answer(text).rstrip(".:,").lstrip("(").rstrip(")")


def option_letter(text: str) -> str:
    """Cambrian's ``extract_mcq_answer``: the first character of ``option_text`` ('' if none)."""
    return option_text(text)[:1]


def _gt_letter(r: Mapping[str, Any]) -> str:
    return str(r["answer"]).strip("() ").lower()


def _ref(r: Any) -> Mapping[str, Any]:
    return r if isinstance(r, Mapping) else {"answer": r}


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _within(pred: str, gt: str, rel_tol: float = 0.05, of_pred: bool = False) -> bool:
    """Cambrian's ``relaxed_accuracy``, for two strings that both parse as numbers: within
    ``rel_tol`` of the ground truth, or of the prediction where Cambrian's MathVista and MMMU
    scripts pass the two the other way round (``of_pred``). Only finite numbers: with
    ``of_pred``, Cambrian's scores an answer of "inf" right against any number."""
    if not (_is_number(pred) and _is_number(gt)):
        return False
    p, g = float(pred), float(gt)
    return math.isfinite(p) and math.isfinite(g) and abs(p - g) <= abs(p if of_pred else g) * rel_tol


def anls(pred: str, answers: Sequence[str], tau: float = 0.5) -> float:
    """DocVQA's Average Normalised Levenshtein Similarity for one question: 1 - NL where NL < tau,
    else 0, as Biten et al. define it (lmms-eval keeps NL = tau exactly, at 0.5)."""
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


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy (M4C's TextVQA evaluator): min(1, matching annotators / 3), averaged over
    the subsets that leave one annotator out. One reference answer: exact match."""
    p, gts = normalize_answer(pred), [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    return sum(min(1.0, sum(g == p for g in gts[:i] + gts[i + 1:]) / 3) for i in range(len(gts))) / len(gts)


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


def _exact(pred: str, r: Mapping[str, Any]) -> bool:
    """MME and GQA: the lower-cased answer without a trailing '.' equals the ground truth."""
    return str(pred).strip().lower().rstrip(".") == str(r["answer"]).lower()


def exact_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([float(_exact(p, r)) for p, r in zip(predictions, refs)])


def multiple_choice(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([float(option_letter(p) == _gt_letter(r)) for p, r in zip(predictions, refs)])


def _all_right(keys: Sequence[Any], right: Sequence[bool]) -> float:
    """% of groups (rows sharing a key) whose rows are all right."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for key, ok in zip(keys, right):
        groups[str(key)].append(ok)
    return _mean([float(all(v)) for v in groups.values()])


def mc_circular(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """MMBench's circular accuracy (Cambrian's reported MMBench number): the rows of one question
    under its shifted options (same ``circular_id``: question, image and source) count once,
    and only if every one is right."""
    refs = _check(predictions, references)
    return _all_right(_unit_keys("mmbench", refs),
                      [option_letter(p) == _gt_letter(r) for p, r in zip(predictions, refs)])


def mc_by_subtask(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """CV-Bench: accuracy per source (2D: ADE20K, COCO; 3D: Omni3D), then their mean."""
    refs = _check(predictions, references)
    groups: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(predictions, refs):
        groups[str(r.get("subtask", ""))].append(float(option_letter(p) == _gt_letter(r)))
    return sum(_mean(v) for v in groups.values()) / len(groups)


def _choice_text(r: Mapping[str, Any]) -> str | None:
    """The right option's text, lower case; None without choices (nothing to compare with)."""
    choices, letter = r.get("choices") or [], _gt_letter(r).upper()
    if not choices:
        return None
    if len(letter) != 1 or letter not in LETTERS[:len(choices)]:
        raise ValueError(f"score: answer {r['answer']!r} is not the letter of one of {len(choices)} choices")
    return str(choices[LETTERS.index(letter)]).lower().strip()


def science_qa(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """ScienceQA: the letter before a '.' or the right option's text (punctuation-blind)."""
    refs = _check(predictions, references)
    squash = str.maketrans("", "", string.punctuation)
    hits = []
    for p, r in zip(predictions, refs):
        answer, text = single_answer(p), _choice_text(r)
        by_text = text is not None and answer.translate(squash).strip() == text.translate(squash).strip()
        hits.append(float(answer.split(".")[0] == _gt_letter(r) or by_text))
    return _mean(hits)


def mc_pairs(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """MMVP: the letter or the option's text; a pair of images counts only if both are right."""
    refs = _check(predictions, references)
    right = []
    for p, r in zip(predictions, refs):
        answer, text = option_text(p), _choice_text(r)
        right.append(answer == _gt_letter(r) or (text is not None and answer == text))
    return _all_right(_unit_keys("mmvp", refs), right)


def mmmu(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """MMMU: the option letter for multiple choice; an open answer exactly, or within 5 %."""
    refs = _check(predictions, references)
    hits = []
    for p, r in zip(predictions, refs):
        gt = str(r["answer"]).lower()
        if r.get("choices"):
            hits.append(float(option_letter(p) == _gt_letter(r)))
        else:
            answer = single_answer(p)
            hits.append(float(answer == gt or _within(answer, gt, of_pred=True)))
    return _mean(hits)


def mathvista(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """MathVista: the whole answer equals the ground truth (the option letter for multiple
    choice, as Cambrian's test reads it), or both are numbers within 5 %."""
    refs = _check(predictions, references)
    hits = []
    for p, r in zip(predictions, refs):
        answer, gt = str(p).lower().strip(), str(r["answer"]).lower()
        hits.append(float(answer == gt or _within(answer, gt, of_pred=True)))
    return _mean(hits)


def relaxed_accuracy(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """ChartQA: within 5 % when answer and ground truth both parse as numbers, else exact."""
    refs = _check(predictions, references)
    hits = []
    for p, r in zip(predictions, refs):
        answer, gt = str(p).lower(), str(r["answer"]).lower()
        hits.append(float(_within(answer, gt) if _is_number(answer) and _is_number(gt) else answer == gt))
    return _mean(hits)


def contains_match(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """OCRBench: right when a ground-truth string occurs in the answer (lower case, newlines
    as spaces; handwritten maths: spaces removed and case kept)."""
    refs = _check(predictions, references)
    hits = []
    for p, r in zip(predictions, refs):
        if r.get("subtask") == HANDWRITTEN_MATH:
            def prep(s: str) -> str:
                return str(s).strip().replace("\n", " ").replace(" ", "")
        else:
            def prep(s: str) -> str:
                return str(s).lower().strip().replace("\n", " ")
        hits.append(float(any(prep(a) in prep(p) for a in _answers(r))))
    return _mean(hits)


def textvqa(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([vqa_accuracy(p, _answers(r)) for p, r in zip(predictions, refs)])


def mean_anls(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    return _mean([anls(p, _answers(r)) for p, r in zip(predictions, refs)])


def first_word(predictions: Sequence[str], references: Sequence[Any]) -> float:
    """RealWorldQA: the first word of the answer equals the ground truth."""
    refs = _check(predictions, references)
    return _mean([float((single_answer(p).split() or [""])[0] == str(r["answer"]).lower())
                  for p, r in zip(predictions, refs)])


def mme_score(predictions: Sequence[str], references: Sequence[Any]) -> float:
    refs = _check(predictions, references)
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for (task, image), p, r in zip(_unit_keys("mme", refs), predictions, refs):
        by_task[task][image].append(_exact(p, r))
    subtask_scores = []
    for images in by_task.values():
        answers = [ok for v in images.values() for ok in v]
        acc = _mean([float(x) for x in answers])
        acc_plus = _mean([float(all(v)) for v in images.values()])
        subtask_scores.append(acc + acc_plus)
    return 10.0 * sum(subtask_scores) / len(subtask_scores)


SCORERS: dict[str, Callable[[Sequence[str], Sequence[Any]], float]] = {
    "mme": mme_score, "mmbench": mc_circular, "seed": multiple_choice, "gqa": exact_match,
    "sqa": science_qa, "mmmu": mmmu, "mathvista": mathvista, "ai2d": multiple_choice,
    "chartqa": relaxed_accuracy, "ocrbench": contains_match, "textvqa": textvqa, "docvqa": mean_anls,
    "mmvp": mc_pairs, "realworldqa": first_word, "cvbench2d": mc_by_subtask, "cvbench3d": mc_by_subtask,
}
assert set(SCORERS) == set(VQA_BENCHMARKS)


def _unit_keys(benchmark: str, refs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The unit each row is scored in: a question, or the group its scorer takes together
    (MMBench's shifted options, MMVP's image pairs, MME's two questions per image)."""
    if benchmark == "mmbench":
        return [r.get("circular_id", k) for k, r in enumerate(refs)]
    if benchmark == "mmvp":
        return [r.get("pair_id", k) for k, r in enumerate(refs)]
    if benchmark == "mme":
        return [(str(r.get("subtask", "")), str(r.get("pair_id", k))) for k, r in enumerate(refs)]
    return list(range(len(refs)))


def scoring_units(benchmark: str, references: Sequence[Any]) -> float:
    """The number of independent units a benchmark's score is a mean over (``standard_error``).
    CV-Bench averages its sources' accuracies: S² / Σ 1/n_s units, as many as give that mean's
    binomial error."""
    refs = [_ref(r) for r in references]
    if not refs:
        return 0.0
    if benchmark in ("cvbench2d", "cvbench3d"):
        sizes: dict[str, int] = defaultdict(int)
        for r in refs:
            sizes[str(r.get("subtask", ""))] += 1
        return len(sizes) ** 2 / sum(1.0 / n for n in sizes.values())
    return float(len({str(k) for k in _unit_keys(benchmark, refs)}))


def score(benchmark: str, predictions: Sequence[str], references: Sequence[Any]) -> float:
    if benchmark not in SCORERS:
        raise KeyError(f"score: unknown benchmark {benchmark!r}; known {list(SCORERS)}")
    return float(SCORERS[benchmark](predictions, references))
