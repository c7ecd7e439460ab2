"""Answering the VQA benchmarks with a trained probe: greedy answers, a round of batches at a time.

At paper scale one benchmark is thousands of questions to an 8B LM, decoded token by token,
longer than what is left of a job after its training stages. So the answers so far are the
state of the part ``answering-<benchmark>`` (``evaluate.progress``): saved when due or before
a stop, and a retry goes on at the next question. A round is one batch per rank; the batches
are the single-process ones (``eval_batch_size`` questions from the first), so a resumed job,
on any number of ranks, pads every question as an uninterrupted one does and gets its answers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

from webssl_repro.evaluate.progress import EvalProgress
from webssl_repro.evaluate.vqa.categories import category_scores, category_standard_errors
from webssl_repro.evaluate.vqa.data import FeatureCache, VqaSample
from webssl_repro.metrics import VQA_BENCHMARKS

if TYPE_CHECKING:
    from webssl_repro.evaluate.vqa.distributed import Parallel
    from webssl_repro.evaluate.vqa.probe import MultimodalProbe

#: ``score(benchmark, predictions, references) -> float`` (``webssl_repro.evaluate.vqa.scorers.score``).
Scorer = Callable[[str, Sequence[str], Sequence[Any]], float]


def answer_rounds(probe: "MultimodalProbe", samples: Sequence[VqaSample], features: FeatureCache, *,
                  batch_size: int = 16, max_new_tokens: int = 32, parallel: Optional["Parallel"] = None,
                  start: int = 0) -> Iterator[list[str]]:
    """The answers to ``samples[start:]``, one round at a time, in order, on every rank: with
    ``parallel`` a round is the next batch of each rank, else one batch. ``start`` is a
    multiple of ``batch_size`` (where a round ended), so the batches are those from 0."""
    if start % batch_size:
        raise ValueError(f"answering from question {start}, which does not begin a batch of {batch_size}")
    sync = parallel.all_finished if parallel is not None and parallel.lockstep else None

    def one(k: int) -> list[str]:
        return probe.answer_batch(samples[k:k + batch_size], features, max_new_tokens, all_finished=sync)

    starts = list(range(start, len(samples), batch_size))
    per_round = 1 if parallel is None else parallel.world_size
    for r in range(0, len(starts), per_round):
        yield one(starts[r]) if parallel is None else parallel.answer_round(starts[r:r + per_round], one)


def answer_benchmark(probe: "MultimodalProbe", name: str, samples: Sequence[VqaSample], features: FeatureCache, *,
                     batch_size: int = 16, max_new_tokens: int = 32, parallel: Optional["Parallel"] = None,
                     progress: Optional[EvalProgress] = None) -> list[str]:
    """All answers to one benchmark; with ``progress``, those so far are the part
    ``answering-<name>`` after each round, and each round is timed for the stop decision."""
    progress = EvalProgress() if progress is None else progress
    part = f"answering-{name}"
    state = progress.torch_state(part)
    answers = [] if state is None else list(state["answers"])
    per_round = batch_size * (1 if parallel is None else parallel.world_size)
    rounds = answer_rounds(probe, samples, features, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           parallel=parallel, start=len(answers))
    for found in progress.resumable_pass(part, state, rounds, len(samples) - len(answers), per_round,
                                         lambda: {"answers": answers}):
        answers += found
    return answers


def evaluate_vqa(probe: "MultimodalProbe", benchmark_sets: Mapping[str, Sequence[VqaSample]],
                 scorer: Optional[Scorer] = None, *,
                 features: FeatureCache, batch_size: int = 16, max_new_tokens: int | Mapping[str, int] = 32,
                 parallel: Optional["Parallel"] = None, progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """Greedy answers on each benchmark's test samples, scored per benchmark; categories by the paper's rule.

    ``categories`` is None unless all 16 benchmarks are present (the paper's averages need all).
    With ``parallel`` the ranks share the answering, rank 0 scores and every rank returns its result.
    With ``progress`` each benchmark's answers are a part, kept and read back by a resumed job,
    and its answering resumes at the next round (``answer_benchmark``). ``max_new_tokens`` is
    one limit for all, or each benchmark's (``VqaConfig.new_tokens``).
    """
    from webssl_repro.evaluate.vqa.scorers import scoring_units

    if scorer is None:
        from webssl_repro.evaluate.vqa.scorers import score as scorer
    progress = EvalProgress() if progress is None else progress
    answers = {}
    for name, samples in benchmark_sets.items():
        progress.stop_point(f"answering {name}")
        kept = progress.result(f"answers-{name}")
        answers[name] = kept if kept is not None else progress.finish(
            f"answers-{name}", answer_benchmark(
                probe, name, list(samples), features, batch_size=batch_size, parallel=parallel, progress=progress,
                max_new_tokens=max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[name]),
            also=(f"answering-{name}",))
    result = None
    if parallel is None or parallel.rank == 0:
        per_benchmark = {name: float(scorer(name, answers[name], [s.reference() for s in samples]))
                         for name, samples in benchmark_sets.items()}
        complete = set(VQA_BENCHMARKS) <= set(per_benchmark)
        units = {name: scoring_units(name, [s.reference() for s in samples])
                 for name, samples in benchmark_sets.items()}
        result = {"benchmarks": per_benchmark, "categories": category_scores(per_benchmark) if complete else None,
                  "standard_errors": category_standard_errors(per_benchmark, units) if complete else None}
    return result if parallel is None else parallel.from_main(result)
