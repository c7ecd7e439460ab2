"""``webssl-repro evaluate <kind>`` and ``classic-no-image``: the evaluation jobs' command lines.

An evaluation job reads its encoder (or a VQA control) and eval sets, opens its saved progress
(``evaluate.progress``: stamped with the config it computes, the encoder and the data), runs
(``classic``, ``alignment``, or the VQA stage's two jobs: ``vqa_probe`` trains the probe,
``vqa`` answers with it) and writes its output on rank 0. ``language-features`` computes one
language model's features of the alignment captions, which every run's alignment job reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from webssl_repro.metrics import VQA_CONTROLS

#: The VQA evaluation's two jobs: the probe trained (``vqa_probe``), the benchmarks answered (``vqa``).
VQA_KINDS = ("vqa", "vqa_probe")


def write_eval(path: Path, run: str, kind: str, metrics: dict, cfg: dict) -> None:
    """``{"metrics": {name: number}, "details": {...}}``; keys starting with ``_`` are details."""
    from webssl_repro.config import config_hash
    from webssl_repro.files import write_json

    out = {"run": run, "kind": kind,
           "metrics": {k: v for k, v in metrics.items() if not k.startswith("_")},
           "details": {k.lstrip("_"): v for k, v in metrics.items() if k.startswith("_")},
           "config_hash": config_hash(cfg)}
    write_json(path, out, indent=2, sort_keys=True)


def state_config(kind: str, computed: Mapping[str, Any]) -> dict[str, Any]:
    """``computed`` (the rule's params) with the code's defaults filled in and the settings left
    out: what an evaluation's saved state depends on, so that a changed default, not only a
    changed config file, sets that state aside (e.g. a longer ``max_new_tokens``)."""
    from dataclasses import asdict

    from webssl_repro.settings import SETTINGS, split_settings

    if kind == "classic":
        from webssl_repro.evaluate.classic import classic_config

        resolved = classic_config({k: v for k, v in computed.items() if k != "scale"})
    elif kind in ("vqa", "vqa_probe"):
        from webssl_repro.evaluate.vqa.config import VqaConfig, probe_section
        from webssl_repro.evaluate.vqa.stage import STAGE_KEYS

        stage = {k: v for k, v in computed.items() if k in STAGE_KEYS}
        resolved = {**stage, **asdict(VqaConfig.from_mapping({k: v for k, v in computed.items() if k not in stage}))}
        if kind == "vqa_probe":  # nor the answering's defaults: a new default answer length trains nothing again
            resolved = probe_section(resolved)
    else:
        resolved = dict(computed)
    return split_settings(resolved, SETTINGS[kind])[0]


def evaluate(args: argparse.Namespace) -> int:
    import json

    from webssl_repro.config import config_hash
    from webssl_repro.evaluate import progress as eval_progress
    from webssl_repro.settings import merge_nested
    from webssl_repro.train import Preempted, attempts
    from webssl_repro.train.distributed import shutdown

    if args.control and (args.kind not in VQA_KINDS or args.img_size is None or args.patch is None):
        raise ValueError("--control is a VQA probe control and needs --img-size and --patch")
    if args.probe is not None and args.kind != "vqa":
        raise ValueError(f"--probe is the trained probe a vqa job answers with, not an input of {args.kind}")
    if args.language_features and args.kind != "alignment":
        raise ValueError(f"--language-features are the alignment job's language-model features, not an input "
                         f"of {args.kind}")
    computed = json.loads(args.eval_json)  # the result's config_hash: settings do not change results
    section = "vqa" if args.kind in VQA_KINDS else args.kind
    cfg, settings = eval_progress.split_settings(merge_nested(computed, json.loads(args.settings_json)), section)
    if args.probe is not None:  # a probe of another recipe or run: refused before any state is set aside
        from webssl_repro.evaluate.vqa.trained import read_record

        read_record(args.probe, cfg, run=args.run)
    progress = eval_progress.EvalProgress()
    state = args.state if args.state is not None else eval_progress.state_dir(args.out, args.kind)
    ledger = args.kind in eval_progress.RESUMABLE and state is not None and args.attempt is not None

    def record(outcome: str, error: BaseException | None = None, cause: str | None = None) -> None:
        if ledger and Path(state).is_dir():
            attempts.record_end(state, outcome, error, measure=eval_progress.SAVED, cause=cause)

    # The inputs are read before the saved state is looked at: a bad encoder or manifest would
    # otherwise set the state of the good ones aside (features and all) before failing.
    inputs = _evaluation_inputs(args)
    if args.kind in eval_progress.RESUMABLE and state is not None:
        encoder = (eval_progress.file_identity(args.encoder) if args.encoder else
                   {"control": args.control, "img_size": args.img_size, "patch": args.patch})
        fingerprint = {"kind": args.kind, "config": config_hash(state_config(args.kind, computed)),
                       "encoder": encoder, "data": [eval_progress.file_identity(p) for p in args.data]}
        if args.probe is not None:  # the answers of another trained probe are not these
            from webssl_repro.evaluate.vqa.trained import RECORD

            fingerprint["probe"] = eval_progress.file_identity(args.probe / RECORD)
        try:
            progress = eval_progress.EvalProgress.open(state, fingerprint, settings, attempt=args.attempt)
        except attempts.AttemptRefused as err:
            print(f"evaluate {args.kind} {args.run}: {err}", file=sys.stderr)
            return 1
    from webssl_repro.train.distributed import is_main

    try:
        with progress:
            metrics = _evaluate_metrics(args, cfg, progress, *inputs)
        main = is_main()  # a torchrun-launched vqa probe (evaluate.vqa.strategy) writes on rank 0 only
        if main:
            if args.kind == "vqa_probe":  # the trained probe and its record are written (vqa.trained)
                print(json.dumps(metrics["training"], sort_keys=True))
            else:
                write_eval(Path(args.out), args.run, args.kind, metrics, computed)
                print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("_")}, sort_keys=True))
    except Preempted as err:
        record("preempted", cause=err.cause)
        print(f"evaluate {args.kind} {args.run}: {err}; exiting for a retry", file=sys.stderr)
        shutdown()
        return err.exit_code
    except BaseException as err:
        record("failed", err)
        raise
    shutdown()
    # after the group is down: a job that fails in its teardown loses its output to Snakemake, and
    # its retry resumes from the state (a trained probe is saved again without training a step)
    if main:
        progress.discard()
    return 0


def classic_no_image(args: argparse.Namespace) -> int:
    import json

    from webssl_repro.evaluate.no_image import classic_reference
    from webssl_repro.metrics import NO_IMAGE

    computed = json.loads(args.eval_json)
    metrics = classic_reference(eval_manifests(args.data), {k: v for k, v in computed.items() if k != "scale"})
    write_eval(args.out, NO_IMAGE, "classic", metrics, computed)
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("_")}, sort_keys=True))
    return 0


def language_features(args: argparse.Namespace) -> int:
    import json

    from webssl_repro.evaluate.alignment_eval import write_language_features
    from webssl_repro.settings import merge_nested

    cfg = merge_nested(json.loads(args.eval_json), json.loads(args.settings_json))
    record = write_language_features(args.language_model, args.data, cfg, args.out)
    print(json.dumps(record, sort_keys=True))
    return 0


def eval_manifests(paths: Sequence[str]) -> dict[str, str]:
    """Eval-set manifests by task: the one each names, else its folder's name."""
    from webssl_repro.files import read_json

    return {read_json(p).get("task") or Path(p).parent.name: p for p in paths}


def _evaluation_inputs(args: argparse.Namespace) -> tuple[Any, dict, dict[str, str]]:
    """The encoder (or control), its meta, and the eval-set manifests by task."""
    import torch

    from webssl_repro.models.io import load_encoder

    manifests = eval_manifests(args.data)
    if args.kind == "alignment" and "captions" not in manifests:  # before a 7B encoder is read
        raise ValueError(f"evaluate alignment reads the captions eval set (--data results/<scale>/data/evalsets/"
                         f"captions.json); got {sorted(manifests) or 'no --data'}")
    torch.manual_seed(0)
    if args.control:
        from webssl_repro.evaluate.vqa.controls import control_encoder

        encoder, meta = control_encoder(args.control, args.img_size, args.patch)
    else:
        encoder, meta = load_encoder(args.encoder)
    return encoder, meta, manifests


def _evaluate_metrics(args: argparse.Namespace, cfg: dict, progress, encoder, meta: dict,
                      manifests: dict[str, str]) -> dict:
    """The metrics of one evaluation (``evaluate``; for ``vqa_probe``, the trained probe's
    record), its finished parts kept in ``progress``."""
    import torch

    if args.kind not in VQA_KINDS and torch.cuda.is_available():  # the vqa probe places its own ranks
        encoder = encoder.cuda()  # the frozen encoder on a GPU; the probe heads train beside it
    if args.kind == "classic":
        from webssl_repro.evaluate.classic import run_classic

        return run_classic(encoder, meta, manifests, {k: v for k, v in cfg.items() if k != "scale"}, progress)
    elif args.kind == "alignment":
        from webssl_repro.evaluate.alignment_eval import run_alignment

        return run_alignment(encoder, meta, manifests["captions"], cfg, args.language_features)
    from webssl_repro.evaluate.vqa import stage

    workdir = Path(args.out).parent / "vqa_work"  # the feature cache the run's two vqa jobs share
    if args.kind == "vqa_probe":
        return stage.train_vqa_probe(encoder, meta, manifests, cfg, args.out, workdir, run=args.run, progress=progress)
    if args.probe is not None:
        return stage.answer_vqa(encoder, meta, manifests, cfg, args.probe, workdir, run=args.run, progress=progress)
    return stage.run_vqa(encoder, meta, manifests, cfg, workdir=workdir, progress=progress)


def add_parsers(sub: Any) -> None:
    """The ``evaluate`` and ``classic-no-image`` subcommands."""
    ev = sub.add_parser("evaluate", help="evaluate one run's frozen encoder")
    ev.add_argument("kind", choices=(*VQA_KINDS, "classic", "alignment"),
                    help="vqa_probe trains a VQA probe into the folder --out; vqa answers the benchmarks "
                    "with the one --probe names (without --probe, it trains one first, in this process)")
    ev.add_argument("--run-name", "--run", dest="run", required=True,
                    help="the run (spelt --run-name after torchrun, which takes --run for its own --run-path)")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", type=Path)
    which.add_argument("--control", choices=VQA_CONTROLS,
                       help="a VQA control encoder instead of a run's (evaluate.vqa.controls)")
    ev.add_argument("--img-size", type=int, help="the control's input size")
    ev.add_argument("--patch", type=int, help="the control's patch size")
    ev.add_argument("--eval-json", default="{}", help="what is computed (Plan.eval_config_json)")
    ev.add_argument("--settings-json", default="{}", help="how it runs: workers, batch chunks, local paths "
                    "(Plan.settings_json)")
    ev.add_argument("--data", nargs="*", default=[], help="eval-set manifests (none for paper-scale vqa)")
    ev.add_argument("--out", required=True, type=Path)
    ev.add_argument("--probe", type=Path, default=None,
                    help="vqa: the trained probe to answer with (a vqa_probe job's --out)")
    ev.add_argument("--language-features", nargs="*", type=Path, default=[],
                    help="alignment: each language model's features of the captions (language-features' "
                    "--out); without them, computed in this job")
    ev.add_argument("--state", type=Path, default=None,
                    help="vqa / vqa_probe / classic: where a job too long for its time limit keeps its progress "
                    "for a retry (evaluate/progress.py; default: results/{scale}/eval_state/evals/{run}/{kind} "
                    "for --out results/{scale}/evals/{run}/{kind}.json or .../{run}/vqa_probe, none for an --out "
                    "elsewhere); removed once the output is written and the process group is down")
    ev.add_argument("--attempt", type=int, default=None,
                    help="Snakemake's attempt number: recorded in the state's attempts.jsonl, and the job is "
                    "refused (exit 1) after attempts that failed without saving progress (train/attempts.py)")
    ev.set_defaults(func=evaluate)

    const = sub.add_parser("classic-no-image", help="the best answer to each classic task that ignores the "
                           "image (one class / depth for all, or per position): the bar a classic number must clear")
    const.add_argument("--eval-json", default="{}", help="the classic section (Plan.eval_config_json): the depth "
                       "range and crop the probes score in")
    const.add_argument("--data", nargs=3, required=True, help="the classification, segmentation and depth manifests")
    const.add_argument("--out", required=True, type=Path)
    const.set_defaults(func=classic_no_image)

    lm = sub.add_parser("language-features", help="one language model's features of the alignment captions, "
                        "read by every run's alignment job (evaluate alignment --language-features)")
    lm.add_argument("--language-model", required=True, help="a name of evaluate.alignment.language_models")
    lm.add_argument("--eval-json", default="{}", help="where its weights are (Plan.language_features_json)")
    lm.add_argument("--settings-json", default="{}", help="how it runs: lm_batch_size")
    lm.add_argument("--data", required=True, type=Path, help="the captions eval set's manifest")
    lm.add_argument("--out", required=True, type=Path)
    lm.set_defaults(func=language_features)
