"""report.md and `snakemake --report`: the published scale (in-process, and through snakemake in a
scratch copy), a run scale (synthetic eval JSONs) with each item beside the paper's and the overlay figures."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, snakemake
from test_claims import EXPECTED_PUBLISHED, synthetic_config, write_tree
from webssl_repro.cli import main
from webssl_repro.config import config_hash, load_config
from webssl_repro.paper import specs
from webssl_repro.paper.check import run_check
from webssl_repro.paper.figures import render_figure
from webssl_repro.paper.report import write_report
from webssl_repro.paper.results import item_results
from webssl_repro.paper.tables import render_table
from webssl_repro.workflow import Plan

PUBLISHED = load_config(REPO / "config/published.yaml")


def test_published_report_has_every_item_and_the_claims(tmp_path, monkeypatch):
    """The whole published scale, rendered in-process (the snakemake run below covers the rules)."""
    monkeypatch.chdir(tmp_path)
    plan = Plan(PUBLISHED)
    for item_id in plan.items:
        item = specs.get_item(item_id)
        results = item_results(item, "published", [REPO / p for p in plan.item_inputs(item_id)])
        if item.kind == "table":
            render_table(item, results, plan.item_outputs(item_id), "published")
        else:
            render_figure(item, results, plan.item_outputs(item_id), "published", plan.language_models())
    run_check(PUBLISHED, [], "paper/published/check", REPO / "results/published")
    text = write_report(PUBLISHED, "paper/published/report.md")
    for item in plan.items:
        assert f"### {item}: {specs.get_item(item).title}" in text, item
        if specs.get_item(item).kind != "table":
            assert f"](figures/{item}.png)" in text
    assert re.search(r"\| Web-DINO ViT-7B +\| 1823\.76 .*\| 53\.87 +\|", text)  # Table 6, embedded
    for claim_id in EXPECTED_PUBLISHED:
        assert f"**{claim_id}**" in text
    claims = pd.read_csv("paper/published/check/claims.tsv", sep="\t").set_index("claim")
    assert claims["verdict"].to_dict() == EXPECTED_PUBLISHED
    comparison = pd.read_csv("paper/published/check/comparison.tsv", sep="\t")
    assert set(comparison["status"]) == {"paper itself"} and len(comparison) > 500
    assert f"Per-metric comparison with the paper: paper itself: {len(comparison)} metrics — at the published" in text
    assert f"config hash `{config_hash(PUBLISHED)}`" in text and "git commit `" in text


def test_snakemake_builds_check_report_and_html_report(workflow_dir):
    """`all check report` then `--report` in a scratch copy, at the published scale (three items, for time)."""
    config = dict(PUBLISHED, items=["table6", "table12", "fig3"])
    (workflow_dir / "few.yaml").write_text(yaml.safe_dump(config))
    targets = ("all", "check", "report", "--configfile", "few.yaml")
    proc = snakemake(workflow_dir, "--cores", "2", *targets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (workflow_dir / "paper/published/report.md").read_text()
    assert "### fig3:" in text and "### table12:" in text and "### table2:" not in text
    assert re.search(r"\*\*dino_scales_better_than_clip\*\*:[^|]*\| \*\*holds\*\* \|", text)
    html = snakemake(workflow_dir, "--report", "report.html", *targets)
    assert html.returncode == 0, html.stderr[-3000:]
    html = (workflow_dir / "report.html").read_text(errors="replace")
    assert "pretrains Web-DINO, Web-MAE and CLIP per model size" in html  # report/workflow.rst
    for category, path in (("Tables", "tables/table6.tsv"), ("Figures", "figures/fig3.png"),
                           ("Check", "check/claims.tsv"), ("Report", "report.md")):
        assert re.search(rf'"{category}": {{[^}}]*paper/published/{path}', html), category


def test_run_scale_report_puts_each_item_beside_the_papers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results/published").symlink_to(REPO / "results/published")
    config = synthetic_config(seeds=(0,))
    config["items"] = ["table15", "fig3", "fig9"]
    plan = Plan(config)
    write_tree(tmp_path, plan)
    for item in plan.items:
        inputs = plan.item_inputs(item)
        lms = ["--language-models", "minilm"] if item.startswith("fig") else []
        assert main(["render", item, "--scale", "synth", "--source", "runs", "--inputs", *inputs, *lms,
                     "--outputs", *plan.item_outputs(item)]) == 0
        assert main(["render", item, "--scale", "published", "--source", "published", "--inputs",
                     "results/published/vqa.tsv", *lms, "--outputs", *plan.reference_outputs(item)]) == 0
    out = plan.overlay_output("fig3")
    assert main(["overlay", "fig3", "--scale", "synth", "--published-dir", "results/published",
                 "--inputs", *plan.item_inputs("fig3"), "--out", out]) == 0
    assert (tmp_path / out).stat().st_size > 20_000
    assert main(["check", "--config-json", json.dumps(config), "--published-dir", "results/published",
                 "--outdir", "paper/synth/check", "--inputs", *plan.check_inputs()]) == 0
    assert sorted(plan.report_inputs()) == sorted(p for p in plan.report_inputs() if (tmp_path / p).exists())
    assert main(["report", "--config-json", json.dumps(config), "--out", "paper/synth/report.md"]) == 0
    text = (tmp_path / "paper/synth/report.md").read_text()
    assert "**paper**" in text and re.search(r"\| Web-DINO ViT-7B 518 +\| 1807\.08 .*\| 59\.91 +\|", text)
    assert "](published/figures/fig3.png)" in text and "](figures/fig3_vs_published.png)" in text
    assert "No overlay" in text  # fig9: the paper prints no alignment values
    assert "**higher_resolution_helps**" in text and "does not hold" in text
    assert f"config hash `{config_hash(config)}`" in text


@pytest.mark.parametrize("configfile", ["config/mini.yaml", "config/paper.yaml"])
def test_check_and_report_are_in_every_dry_run(workflow_dir, configfile):
    proc = snakemake(workflow_dir, "-n", "check", "report", "--configfile", configfile)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rule in ("check", "report", "overlay_figure", "render_reference_table", "render_reference_figure"):
        assert re.search(rf"^(local)?rule {rule}:", proc.stdout, re.M), rule


def test_compare_any_runs_eval_files_with_every_number_the_paper_prints(tmp_path, capsys):
    """`webssl-repro compare results/paper/evals/<run>/*.json`: a released checkpoint's (or any
    run's) evaluations against the paper, judged by paper.yaml's tolerances."""
    from webssl_repro.paper.check import published_runs_frame

    published = published_runs_frame().groupby(["source", "metric"])["value"].first()
    linear, ade = published[("dino7b-full8b-224", "in1k_linear")], published[("dino7b-full8b-224", "ade20k_linear")]
    path = tmp_path / "evals" / "dino7b-full8b-224" / "classic.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"in1k_linear": linear + 0.3, "ade20k_linear": ade - 2.0}}))
    assert main(["compare", str(path), "--out", str(tmp_path / "cmp.tsv")]) == 0
    table = pd.read_csv(tmp_path / "cmp.tsv", sep="\t").set_index("metric")
    assert list(table.index) == ["in1k_linear", "ade20k_linear"] and set(table["source"]) == {"dino7b-full8b-224"}
    assert table.loc["in1k_linear", "difference"] == pytest.approx(0.3)
    assert table["status"].to_dict() == {"in1k_linear": "within", "ade20k_linear": "outside"}  # tolerances 0.5, 1.0
    summary, note = capsys.readouterr().out.rstrip().splitlines()[-2:]
    assert summary == "within: 1, outside: 1" and note.startswith("note: The IN-1k linear probe trains here")
    # fractions where percentages belong are named; a misspelt tolerance key is refused, not "no tolerance"
    path.write_text(json.dumps({"metrics": {"in1k_linear": linear / 100, "ade20k_linear": ade}}))
    assert main(["compare", str(path)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-2] == (
        f"warning: dino7b-full8b-224's in1k_linear is {linear / 100:.4g} where the paper prints {linear:.4g}: "
        "eval files hold percentages (0 to 100), not fractions")
    typo = tmp_path / "typo.yaml"
    typo.write_text((REPO / "config/paper.yaml").read_text().replace("in1k_linear: 0.5", "in1k_linaer: 0.5"))
    assert main(["compare", "--configfile", str(typo), str(path)]) == 2
    assert "check.tolerances: unknown metric(s) ['in1k_linaer']" in capsys.readouterr().err
    path.write_text(json.dumps({"metrics": {"in1k_linear": linear + 0.3, "ade20k_linear": ade - 2.0}}))
    # Table 2 prints the 2B runs' % of data: an unfiltered run's 100 is no number its eval files measured
    vqa = tmp_path / "evals" / "dino2b-full2b-224" / "vqa.json"
    vqa.parent.mkdir(parents=True)
    vqa.write_text(json.dumps({"metrics": {"mme": 1700.0}}))
    assert main(["compare", str(vqa), "--out", str(tmp_path / "cmp2.tsv")]) == 0
    assert set(pd.read_csv(tmp_path / "cmp2.tsv", sep="\t")["metric"]) == {"mme"}
    # a path that is no eval result, or none at all, is named, not skipped
    assert main(["compare", str(path), str(tmp_path / "classic_v2.json")]) == 2
    assert "classic_v2.json: not an eval result" in capsys.readouterr().err
    assert main(["compare", str(path.with_name("vqa.json"))]) == 2
    assert "vqa.json does not exist" in capsys.readouterr().err
    for pattern in ("dino2b-heavy2b-224/*.json", "*/vqa.json"):
        assert main(["compare", str(tmp_path / "evals" / pattern)]) == 2
        assert f"{pattern}: the pattern matches no file" in capsys.readouterr().err
    # an imported off-the-shelf encoder against the paper's own numbers for it (Table 14)
    dinov2 = tmp_path / "evals" / "dinov2-g-224" / "vqa.json"
    dinov2.parent.mkdir(parents=True)
    dinov2.write_text(json.dumps({"metrics": {"gqa": 62.89 - 0.4, "textvqa": 47.06 + 3.0}}))
    assert main(["compare", str(dinov2), "--out", str(tmp_path / "dinov2.tsv")]) == 0
    table = pd.read_csv(tmp_path / "dinov2.tsv", sep="\t").set_index("metric")
    assert set(table["source"]) == {"dinov2-g-224"} and set(table["items"]) == {"table14"}
    assert table.loc["gqa", "published"] == 62.89 and table.loc["gqa", "difference"] == pytest.approx(-0.4)
    assert table.loc["textvqa", "difference"] == pytest.approx(3.0)
    # MAE ViT-H's classic numbers are printed in Table 3 only
    mae = tmp_path / "evals" / "mae-h-224" / "classic.json"
    mae.parent.mkdir(parents=True)
    mae.write_text(json.dumps({"metrics": {"in1k_linear": 76.6 - 1.0}}))
    assert main(["compare", str(mae), "--out", str(tmp_path / "mae.tsv")]) == 0
    table = pd.read_csv(tmp_path / "mae.tsv", sep="\t").set_index("metric")
    assert set(table["source"]) == {"mae-h-224"} and set(table["items"]) == {"table3"}
    assert table.loc["in1k_linear", "published"] == 76.6
    assert table.loc["in1k_linear", "difference"] == pytest.approx(-1.0)
    # MetaCLIP ViT-bigG's, in Table 3 (Fig. 7's reference line is read from that row)
    metaclip = tmp_path / "evals" / "metaclip-g-224" / "classic.json"
    metaclip.parent.mkdir(parents=True)
    metaclip.write_text(json.dumps({"metrics": {"in1k_linear": 86.4 + 0.2}}))
    assert main(["compare", str(metaclip), "--out", str(tmp_path / "metaclip.tsv")]) == 0
    table = pd.read_csv(tmp_path / "metaclip.tsv", sep="\t").set_index("metric")
    assert set(table["source"]) == {"metaclip-g-224"} and table.loc["in1k_linear", "published"] == 86.4
    assert table.loc["in1k_linear", "difference"] == pytest.approx(0.2)
    # I-JEPA's Average, printed 44.78 (Table 14) and 44.7 (Table 3): set beside the finer one
    ijepa = tmp_path / "evals" / "ijepa-h-224" / "vqa.json"
    ijepa.parent.mkdir(parents=True)
    ijepa.write_text(json.dumps({"metrics": {"Average": 44.0}}))
    assert main(["compare", str(ijepa), "--out", str(tmp_path / "ijepa.tsv")]) == 0
    table = pd.read_csv(tmp_path / "ijepa.tsv", sep="\t").set_index("metric")
    assert table.loc["Average", "published"] == 44.78 and table.loc["Average", "items"] == "table3 table14"


def test_compare_takes_the_files_scale_config_and_evals_after_configfile(tmp_path, monkeypatch):
    """Without --configfile the tolerances are those of the scale the path names (mini's judge
    nothing comparable); eval files written after a --configfile are evals, not configs."""
    from webssl_repro.paper.commands import compare_inputs

    monkeypatch.chdir(REPO)
    mini = Path("/x/results/mini/evals/dino7b-full8b-224/classic.json")
    paper = Path("results/paper/evals/dino7b-full8b-224/vqa.json")
    assert compare_inputs([mini], None) == ([mini], [Path("config/mini.yaml")])
    assert compare_inputs([paper], None) == ([paper], [Path("config/paper.yaml")])
    assert compare_inputs([], [Path("config/mini.yaml"), mini]) == ([mini], [Path("config/mini.yaml")])
    assert compare_inputs([tmp_path / "evals" / "r" / "classic.json"], None)[1] == [Path("config/paper.yaml")]
    with pytest.raises(ValueError, match=r"scales \['mini', 'paper'\]"):
        compare_inputs([mini, paper], None)
    with pytest.raises(ValueError, match="no config/paperr.yaml"):
        compare_inputs([Path("results/paperr/evals/r/classic.json")], None)
    with pytest.raises(ValueError, match="name at least one eval file"):
        compare_inputs([], [Path("config/paper.yaml")])


def test_compare_says_where_the_benchmarks_data_differ_from_the_papers(tmp_path, capsys):
    """DocVQA is scored on validation here, on the test server in the paper: a comparison that
    includes it (the benchmark, OCR & Chart, the Average) says so, one that does not stays quiet.
    So does one of the IN-1k linear probe, which trains without DINOv2's per-batch crops."""
    from webssl_repro.paper.check import protocol_notes

    assert protocol_notes(["ade20k_linear", "mme"]) == []
    assert [n.split()[:3] for n in protocol_notes(["in1k_linear", "mme"])] == [["The", "IN-1k", "linear"]]
    assert [n.split()[0] for n in protocol_notes(["OCR & Chart"])] == ["DocVQA"]
    assert [n.split()[0] for n in protocol_notes(["Average"])] == ["DocVQA", "MMVP"]
    from webssl_repro.paper.check import comparison_summary

    missing = pd.DataFrame([{"metric": "in1k_linear", "status": "within"}, {"metric": "docvqa", "status": "missing"}])
    assert "DocVQA" not in comparison_summary(missing, "comparable")  # no DocVQA number was compared
    assert "The IN-1k linear probe trains here on features" in comparison_summary(missing, "comparable")
    assert "DocVQA is scored here" in comparison_summary(missing.assign(status="outside"), "comparable")
    path = tmp_path / "evals" / "dino7b-full8b-224" / "vqa.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"docvqa": 50.0, "gqa": 60.0}}))
    assert main(["compare", str(path), "--configfile", str(REPO / "config/paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "docvqa" in out and "note: DocVQA is scored here by a local ANLS on its validation split" in out
    assert "MMVP" not in out
