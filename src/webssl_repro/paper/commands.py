"""``webssl-repro check | report | compare | overlay``: the paper stage's command lines
(registered by ``cli.build_parser``; nothing heavy is imported until a command runs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _check_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.paper.check import run_check

    results, table = run_check(json.loads(args.config_json), args.inputs, args.outdir, args.published_dir)
    for r in results:
        print(f"{r.claim.id}: {r.verdict}")
    print(f"comparison: {len(table)} metrics")
    return 0


def _report_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.paper.report import write_report

    write_report(json.loads(args.config_json), args.out)
    print(f"report: wrote {args.out}")
    return 0


def compare_inputs(evals: list[Path], configfile: list[Path] | None) -> tuple[list[Path], list[Path]]:
    """The eval files and the configs of ``compare``. ``--configfile`` takes several values, as
    Snakemake's does, so eval files after it land there: those under an ``evals/`` folder are
    evals. Without a config, the one of the scale that the files' ``results/{scale}/`` names."""
    configs = [p for p in configfile or [] if not (p.suffix == ".json" and p.parent.parent.name == "evals")]
    evals = [*evals, *(p for p in configfile or [] if p not in configs)]
    if not evals:
        raise ValueError("compare: name at least one eval file (results/{scale}/evals/<run>/<kind>.json)")
    if configs:
        return evals, configs
    scales = {p.parts[i + 1] for p in evals for i in range(len(p.parts) - 3)
              if p.parts[i] == "results" and p.parts[i + 2] == "evals"}
    if len(scales) > 1:
        raise ValueError(f"compare: the eval files are of scales {sorted(scales)}, judged by different tolerances: "
                         "compare them apart, or name one config with --configfile")
    config = Path("config") / f"{scales.pop() if scales else 'paper'}.yaml"
    if not config.exists():
        raise ValueError(f"compare: no {config} (run from the checkout's root), or name the config whose "
                         "check.tolerances judge the differences with --configfile")
    return evals, [config]


def _compare_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.config import load_configs
    from webssl_repro.paper.check import compare_evals, fraction_suspects, protocol_notes

    evals, configs = compare_inputs(args.evals, args.configfile)
    check = load_configs(configs).get("check", {})
    table = compare_evals(evals, check.get("tolerances", {}), check.get("comparable", False), args.published_dir)
    if table.empty:
        print("compare: the paper prints none of these runs' metrics")
        return 0
    shown = table.drop(columns=["reproduced_sd"] if table["n_seeds"].max() < 2 else [])
    print(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    print(", ".join(f"{status}: {n}" for status, n in table["status"].value_counts().items()))
    for suspect in fraction_suspects(table):
        print(f"warning: {suspect}")
    if check.get("comparable", False):
        for note in protocol_notes(table["metric"]):
            print(f"note: {note}")
    if args.out is not None:
        table.to_csv(args.out, sep="\t", index=False, na_rep="NA", float_format="%.6g")
    return 0


def _overlay_cmd(args: argparse.Namespace) -> int:
    from webssl_repro.paper.figures import render_overlay

    render_overlay(args.item, args.scale, args.inputs, args.out, args.published_dir)
    print(f"{args.item}: wrote {args.out}")
    return 0


def add_parsers(sub) -> None:
    """``webssl-repro check | report | compare | overlay`` (registered by cli.build_parser)."""
    check = sub.add_parser("check", help="evaluate the paper's claims and compare numbers with the paper")
    check.add_argument("--config-json", required=True, help="the config (scale, source, items, stages, seeds, check)")
    check.add_argument("--inputs", nargs="*", default=[], type=Path)
    check.add_argument("--outdir", required=True, type=Path)
    check.add_argument("--published-dir", default=None, type=Path)
    check.set_defaults(func=_check_cmd)

    report = sub.add_parser("report", help="write paper/{scale}/report.md from the rendered items and the check")
    report.add_argument("--config-json", required=True)
    report.add_argument("--out", required=True, type=Path)
    report.set_defaults(func=_report_cmd)

    compare = sub.add_parser("compare", help="eval JSONs of any runs against the numbers the paper prints for them")
    compare.add_argument("evals", nargs="*", type=Path, help="results/{scale}/evals/<run>/<kind>.json files")
    compare.add_argument("--configfile", nargs="+", default=None, type=Path,
                         help="the config whose check.tolerances judge the differences (default: config/{scale}.yaml "
                              "of the files' results/{scale}/, else config/paper.yaml)")
    compare.add_argument("--published-dir", default=None, type=Path)
    compare.add_argument("--out", default=None, type=Path, help="also write the table as TSV")
    compare.set_defaults(func=_compare_cmd)

    overlay = sub.add_parser("overlay", help="a figure's reproduced values over the paper's, twin y-axes")
    overlay.add_argument("item")
    overlay.add_argument("--scale", required=True)
    overlay.add_argument("--inputs", nargs="*", default=[], type=Path)
    overlay.add_argument("--published-dir", default=None, type=Path)
    overlay.add_argument("--out", required=True, type=Path)
    overlay.set_defaults(func=_overlay_cmd)
