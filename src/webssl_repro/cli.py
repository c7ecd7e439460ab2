"""``webssl-repro <stage> …``: the one entry point the Snakemake rules call.

Each stage lives in its own module and is imported only when its subcommand runs,
so rendering a table never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _render(args: argparse.Namespace) -> int:
    from webssl_repro.paper import specs
    from webssl_repro.paper.results import item_results, published_directory

    item = specs.get_item(args.item)
    results = item_results(item, args.source, args.inputs)
    if item.kind == "table":
        from webssl_repro.paper.tables import render_table

        render_table(item, results, args.outputs, args.scale, published_directory(args.source, args.inputs),
                     args.legend)
    else:
        from webssl_repro.paper.figures import render_figure

        render_figure(item, results, args.outputs, args.scale, args.language_models or ["minilm"], args.legend)
    print(f"{item.id}: wrote {', '.join(map(str, args.outputs))}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import yaml

    from webssl_repro.config import load_configs
    from webssl_repro.workflow import Plan

    plan = Plan(load_configs(args.configfile))
    print(f"scale={plan.scale} source={plan.config['source']} stages={sorted(plan.stages)}")
    items = [*plan.items, *(["fig8"] if plan.data_figures() else [])]
    print(f"items ({len(items)}): {' '.join(items)}")
    if plan.published:
        return 0
    rows = []
    for run in plan.runs:  # one row per run; seeds repeat it (the totals below count each)
        if not plan.trained(run):
            rows.append({"run": run, "imported": plan.run_sources[run]["checkpoint"]})
            continue
        res = plan.pretrain_resources(run)
        rows.append({"run": run, "nodes": res.nodes, "gpus": res.gpus, "runtime_h": round(res.total_min / 60, 1),
                     "jobs": res.jobs, "gpu_hours": round(res.gpu_hours),
                     "train_PFLOP": round(res.train_flops / 1e15),
                     "activations_gb_per_gpu": round(res.activation_gb, 1), "recomputed": res.recomputed})
    print(yaml.safe_dump({"seeds": plan.seeds, "runs": rows}, sort_keys=False), end="")
    for item_id in plan.items:
        print(plan.cost_line(item_id))
    print(plan.cost_line() + plan.memory_line())
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import json

    from webssl_repro.settings import merge_nested
    from webssl_repro.train import Preempted, attempts
    from webssl_repro.train.distributed import shutdown
    from webssl_repro.train.run import pretrain

    cfg = merge_nested(json.loads(args.config_json), json.loads(args.settings_json))
    try:
        if cfg.get("run") not in (None, args.run):
            raise ValueError(f"--config-json is for run {cfg.get('run')!r}, not {args.run!r}")
        result = pretrain(args.run, cfg, args.out, args.checkpoints, args.data, parent=args.parent,
                          max_steps=args.max_steps)
    except Preempted as err:
        attempts.record_end(args.checkpoints, "preempted", cause=err.cause)
        print(f"pretrain {args.run}: preempted at step {err.step}; checkpoint written, exiting for a retry",
              file=sys.stderr)
        return err.exit_code
    except BaseException as err:
        attempts.record_end(args.checkpoints, "failed", err)
        raise
    finally:
        shutdown()
    attempts.record_end(args.checkpoints, "complete" if result.complete else "stopped")
    print(f"pretrain {args.run}: step {result.step}, {result.samples_seen} samples seen, complete={result.complete}")
    return 0


def _guard_checkpoints(args: argparse.Namespace) -> int:
    import json

    from webssl_repro.train.attempts import MAX_FUTILE, AttemptRefused, begin, refuse_if_live
    from webssl_repro.train.fingerprint import guard_checkpoints, run_fingerprint

    try:
        refuse_if_live(args.checkpoints)  # before a changed config sets a running job's checkpoints aside
        guard_checkpoints(args.checkpoints, run_fingerprint(json.loads(args.config_json), args.data, args.parent),
                          adopt=args.adopt)
        max_futile = MAX_FUTILE if args.max_futile_attempts is None else args.max_futile_attempts
        begin(args.checkpoints, args.attempt, max_futile)
    except AttemptRefused as err:
        print(f"webssl-repro guard-checkpoints: {err}", file=sys.stderr)
        return 1
    return 0


def _import_released(args: argparse.Namespace) -> int:
    from webssl_repro.models.released import import_released, run_checkpoint
    from webssl_repro.releases import names_checkpoint
    from webssl_repro.runs import split_seed

    rel = run_checkpoint(split_seed(args.run)[0])
    if not names_checkpoint(args.checkpoint, rel.checkpoint):
        raise ValueError(f"run {args.run} imports {rel.checkpoint}, not {args.checkpoint}")
    path = import_released(rel, args.path, args.out, allow_download=args.allow_download)
    print(f"{args.run}: imported {args.checkpoint} -> {path}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from webssl_repro.models.hf import export_hf
    from webssl_repro.models.io import load_encoder

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"export-hf --out {args.out} is a file; give the directory to write the model into")
    encoder, meta = load_encoder(args.encoder)
    path = export_hf(encoder, meta, args.out)
    print(f"{args.encoder} -> {path} (transformers.AutoModel.from_pretrained reads it)")
    return 0


def _data(args: argparse.Namespace) -> int:
    from webssl_repro.data.stages import main as data_main

    return data_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webssl-repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)

    render = sub.add_parser("render", help="render one table or figure of the paper")
    render.add_argument("item", help="table2 … table15, fig1 … fig9")
    render.add_argument("--scale", required=True)
    render.add_argument("--source", choices=("published", "runs"), required=True)
    render.add_argument("--inputs", nargs="*", default=[], type=Path)
    render.add_argument("--outputs", nargs="+", required=True, type=Path)
    render.add_argument("--language-models", nargs="*", default=None)
    render.add_argument("--legend", default="", help="what the paper's labels stand for at this scale (a footnote)")
    render.set_defaults(func=_render)

    pre = sub.add_parser("pretrain", help="train one run (resumes from its checkpoint dir)")
    pre.add_argument("--run-name", "--run", dest="run", required=True,
                     help="the run (spelt --run-name after torchrun, whose own --run-path would swallow --run)")
    pre.add_argument("--config-json", required=True, help="the run's config slice (Plan.run_config_json)")
    pre.add_argument("--settings-json", default="{}", help="how it runs: log/checkpoint cadence (Plan.settings_json)")
    pre.add_argument("--out", required=True, type=Path)
    pre.add_argument("--checkpoints", required=True, type=Path)
    pre.add_argument("--data", nargs="+", required=True, help="data manifest: the corpus or a filter result's kept shards")
    pre.add_argument("--parent", default=None, help="state.pt of the 224 px run for a hi-res fine-tune")
    pre.add_argument("--max-steps", type=int, default=None, help="stop early (checkpointed), e.g. for tests")
    pre.set_defaults(func=_pretrain)

    guard = sub.add_parser("guard-checkpoints", help="set a run's checkpoints aside if another config or "
                           "other inputs made them (the pretrain rules call it before launching)")
    guard.add_argument("--config-json", required=True, help="the run's config slice (Plan.run_config_json)")
    guard.add_argument("--checkpoints", required=True, type=Path)
    guard.add_argument("--data", nargs="+", required=True, help="data manifest: the corpus or a filter result's kept shards")
    guard.add_argument("--parent", default=None, help="state.pt of the 224 px run for a hi-res fine-tune")
    guard.add_argument("--adopt", action="store_true", help="stamp an unstamped directory as this run's "
                       "(checkpoints from before stamps existed) instead of setting it aside")
    guard.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number (1 = a new invocation)")
    guard.add_argument("--max-futile-attempts", type=int, default=None,
                       help="refuse to start once this many attempts in a row made no checkpoint and were "
                       "not preempted (default: train/attempts.py's MAX_FUTILE, as Plan.pretrain_job_resources)")
    guard.set_defaults(func=_guard_checkpoints)

    from webssl_repro.evaluate.jobs import add_parsers as add_evaluate_parsers

    add_evaluate_parsers(sub)

    imp = sub.add_parser("import-released", help="a run from a released Web-SSL checkpoint (or an off-the-shelf "
                         "encoder the paper compares against, e.g. dinov2-g-224) instead of training")
    imp.add_argument("--run", required=True)
    imp.add_argument("--checkpoint", required=True, help="released id, e.g. facebook/webssl-dino2b-heavy2b-224 "
                     "(facebook/dinov2-giant for dinov2-g-224/378/518, facebook/vit-mae-huge for mae-h-224, "
                     "facebook/metaclip-h14-fullcc2.5b for metaclip-h-224; MetaCLIP's G14_fullcc2.5b.pt for "
                     "metaclip-g-224, which is on no hub and needs --path; facebook/ijepa_vith14_22k for "
                     "ijepa-h-224; google/siglip-so400m-patch14-384 for siglip-so400m-384, and so on for "
                     "siglip[2]-so400m-224/384)")
    imp.add_argument("--path", default=None, help="local HF directory or native .pth")
    imp.add_argument("--allow-download", action="store_true", help="fetch from the hub (paper scale only)")
    imp.add_argument("--out", required=True, type=Path)
    imp.set_defaults(func=_import_released)

    exp = sub.add_parser("export-hf", help="a run's encoder as a transformers model directory (Dinov2Model "
                         "with SwiGLU for Web-DINO / CLIP towers, ViTModel for Web-MAE)")
    exp.add_argument("--encoder", required=True, type=Path, help="results/{scale}/runs/<run>/encoder.safetensors")
    exp.add_argument("--out", required=True, type=Path, help="the directory to write")
    exp.set_defaults(func=_export_hf)

    data = sub.add_parser("data", help="data stage: shards, in1k, filter, filter-merge, evalset, fig8", add_help=False)
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(func=_data)

    plan = sub.add_parser("plan", help="print the run grid, cluster resources and GPU-hours of a config")
    plan.add_argument("--configfile", nargs="+", default=[Path("config/mini.yaml")], type=Path,
                      help="config file(s), later ones merged over earlier ones as snakemake does "
                      "(default: config/mini.yaml)")
    plan.set_defaults(func=_plan)

    from webssl_repro.launch import add_launch_parser

    add_launch_parser(sub)
    from webssl_repro.paper.commands import add_parsers as add_paper_parsers
    add_paper_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["data"]:  # the data stage parses its own arguments, --help included
        args = argparse.Namespace(stage="data", rest=argv[1:], func=_data)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as err:
        # a KeyError's str() is its message quoted; a bare key (a lookup that failed, not one of
        # this package's messages) is shown as what it is
        message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err
        if isinstance(err, KeyError) and not any(ch.isspace() for ch in str(message)):
            message = f"KeyError: {message!r} (a missing key or name)"
        print(f"webssl-repro {args.stage}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
