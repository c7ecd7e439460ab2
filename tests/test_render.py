"""Renderers on run-scale results: eval JSONs in, tables/figures out, gaps visible."""
import json
import math

import pandas as pd
from matplotlib.container import ErrorbarContainer
import pytest

from webssl_repro.cli import main
from webssl_repro.metrics import VQA_BENCHMARKS
from webssl_repro.paper import specs
from webssl_repro.paper.results import item_results
from webssl_repro.paper.figures import render_figure
from webssl_repro.workflow import shipped_plan
from webssl_repro.paper.tables import render_table


def _write_vqa(root, run, offset):
    metrics = {b: 40.0 + offset for b in VQA_BENCHMARKS}
    metrics["mme"] = 1000.0 + 10 * offset
    path = root / "evals" / run / "vqa.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": run, "metrics": metrics}))
    return path


def _md_rows(path):
    """The body rows of a rendered Markdown table, as stripped cells."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines]


def test_run_scale_table_has_categories_and_published_baselines(tmp_path):
    item = specs.get_item("table15")
    inputs = [_write_vqa(tmp_path, run, k) for k, run in enumerate(item.runs)]
    frame = item_results(item, "runs", inputs)
    outputs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")]
    legend = shipped_plan("mini").label_legend()
    table = render_table(item, frame, outputs, "mini", legend=legend).set_index("source")
    assert "ViT-1B, 2B, 3B, 5B, 7B are towers of width 48, 64, 80, 96, 128, depth 4 and patch 8" in legend
    assert "224, 378, 518 px are 32, 48, 64 px" in legend and legend in outputs[1].read_text()
    assert shipped_plan("published").label_legend() == ""
    # General = (MME/20 + 3 x score) / 4 ; the other categories are the plain score
    assert table.loc["dino7b-full8b-378", "Average"] == pytest.approx(((1010 / 20 + 3 * 41) / 4 + 3 * 41) / 4)
    assert (table["origin"] == "run").all()
    tex = outputs[2].read_text()
    assert r"\begin{tabular}" in tex and "Web-DINO ViT-7B 518" in tex


def test_baseline_rows_at_a_run_scale_are_published_and_marked(tmp_path):
    item = specs.get_item("table3")
    frame = item_results(item, "runs", [])
    outputs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")]
    table = render_table(item, frame, outputs, "mini").set_index("source")
    assert table.loc["siglip2-so400m-384", "Average"] == 62.0
    assert table.loc["siglip2-so400m-384", "origin"] == "published"
    assert math.isnan(table.loc["dino7b-full8b-518", "Average"])  # not run yet: a gap, not a number
    md = outputs[1].read_text()
    rows = _md_rows(outputs[1])
    assert rows[3][:6] == ["SigLIP2 ViT-SO400M †", "lang-sup", "WebLI", "45.0B", "384", "62.0"]
    # the paper's descriptive columns, for our runs too (their grid labels), with a note saying so
    assert rows[10][:6] == ["Web-DINO ViT-7B", "SSL", "MC-2B", "8.0B", "518", "—"]
    assert "name each run's place in the paper's grid" in md
    assert "What the paper's labels stand for" not in md  # no number of a run here to explain
    tex = outputs[2].read_text()
    assert r"\multicolumn{5}{c}{VQA} & \multicolumn{5}{c}{Classic vision}" in tex
    assert tex.count(r"\midrule") == 2  # under the header, and between language-supervised and SSL rows


def test_table2_prints_shares_and_deltas_as_the_paper(tmp_path):
    item = specs.get_item("table2")
    outputs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")]
    render_table(item, item_results(item, "published"), outputs, "published")
    rows = {row[0]: row[1:] for row in _md_rows(outputs[1])}
    # Table 2: "100%" / "50.3%", and Light / Heavy against the unfiltered Web-DINO ViT-2B
    assert rows["Web-DINO ViT-2B"][:2] == ["100%", "50.8"]
    assert rows["Web-DINO ViT-2B (Light)"][:5] == ["50.3%", "53.4 (+2.6)", "73.0 (+0.2)", "51.7 (+4.6)", "55.6 (-0.8)"]
    assert rows["Web-DINO ViT-2B (Heavy)"][-4:] == ["47.5 (+24.2)", "29.4 (+13.8)", "52.8 (+3.6)", "32.0 (+13.0)"]
    tex = outputs[2].read_text()
    assert r"Web-DINO ViT-2B (Heavy) & 1.3\% & 53.7 (+2.9)" in tex


def test_run_numbers_round_halves_up_and_deltas_are_of_the_printed_numbers(tmp_path):
    """30.25 prints 30.3 at one decimal (Python's own format gives 30.2), and a delta is the
    difference of the two printed numbers: 30.3 - 30.0 = +0.3, where the unrounded 0.21 prints +0.2."""
    from webssl_repro.paper.tables import half_up

    assert [half_up(v, 1) for v in (30.25, 30.35, 2.05, -0.25)] == ["30.3", "30.4", "2.1", "-0.3"]
    assert half_up(2.675, 2) == "2.68" and half_up(0.1, 1, "+") == "+0.1"
    item = specs.get_item("table2")
    base, light = item.delta_from, item.rows[2].source
    rows = [{"source": src, "metric": "Average", "value": v, "origin": "run", "seed": 0}
            for src, v in ((base, 30.04), (light, 30.25))]
    outputs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")]
    render_table(item, pd.DataFrame(rows), outputs, "mini")
    cells = {row[0]: row[2] for row in _md_rows(outputs[1])}
    assert cells[item.rows[1].label] == "30.0" and cells[item.rows[2].label] == "30.3 (+0.3)"


def test_fig1_says_the_papers_own_arithmetic_only_at_the_published_scale(tmp_path):
    item = specs.get_item("fig1")
    outputs = [tmp_path / "f.pdf", tmp_path / "f.png"]
    published = render_figure(item, item_results(item, "published"), outputs, "published")
    mini = render_figure(item, item_results(item, "runs", []), outputs, "mini")
    assert "prints +4.6" in published._suptitle.get_text() and "prints +4.6" not in mini._suptitle.get_text()
    assert "gain from its first to its last" in mini._suptitle.get_text()


def test_latex_superscripts_and_category_headers(tmp_path):
    item = specs.get_item("table6")
    outputs = [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")]
    render_table(item, item_results(item, "published"), outputs, "published")
    tex = outputs[2].read_text()
    assert r"MME\textsuperscript{P} & MMB & SEED\textsuperscript{I}" in tex and "^" not in tex.replace("$^\\dagger$", "")
    assert (r" & \multicolumn{4}{c}{General} & \multicolumn{4}{c}{Knowledge} & \multicolumn{4}{c}{OCR \& Chart} & "
            r"\multicolumn{4}{c}{Vision-Centric} &  \\ \cmidrule(lr){2-5}") in tex
    assert r"ViT-1B\ldots{}7B" in tex and "…" not in tex


def test_filter_stats_give_table2_data_share(tmp_path):
    item = specs.get_item("table2")
    inputs = [_write_vqa(tmp_path, run, 0) for run in item.runs]
    for variant, kept in (("light", 0.48), ("heavy", 0.03)):
        path = tmp_path / "filter" / f"{variant}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"kept_fraction": kept}))
        inputs.append(path)
    wide = item_results(item, "runs", inputs).pivot_table(index="source", columns="metric", values="value")
    assert wide.loc["dino2b-light2b-224", "data_pct"] == pytest.approx(48.0)
    assert wide.loc["dino2b-heavy2b-224", "data_pct"] == pytest.approx(3.0)
    assert wide.loc["clip2b-full2b-224", "data_pct"] == 100.0


def test_bad_eval_json_names_file_and_metric(tmp_path, capsys):
    path = tmp_path / "evals" / "dino1b-full2b-224" / "vqa.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"gqa": "high"}}))
    outputs = [str(tmp_path / f"t.{e}") for e in ("tsv", "md", "tex")]
    code = main(["render", "table6", "--scale", "mini", "--source", "runs", "--inputs", str(path),
                 "--outputs", *outputs])
    assert code == 2
    err = capsys.readouterr().err
    assert "vqa.json" in err and "'gqa'" in err and "high" in err


def test_published_figure_marks_gaps(tmp_path):
    outputs = [str(tmp_path / "fig4.pdf"), str(tmp_path / "fig4.png")]
    assert main(["render", "fig4", "--scale", "published", "--source", "published", "--outputs", *outputs]) == 0
    frame = item_results(specs.get_item("fig4"), "published")
    clip = frame[frame["source"].str.startswith("clip7b")]
    # only CLIP-7B at 2B seen is printed (Table 12); 1B/4B/8B are gaps
    assert set(clip["source"]) == {"clip7b-full2b-224"}
    assert (tmp_path / "fig4.png").stat().st_size > 10_000


@pytest.mark.parametrize("item_id", ["fig1", "fig7"])
def test_a_run_scale_figure_leaves_out_the_papers_baselines(tmp_path, item_id):
    """Mini's own numbers (~20-30) beside the paper's DINOv2 / MetaCLIP (49-86) on one axis
    would flatten the runs' curves: baselines not run at the scale are left out and named
    (the tables mark them †); the published render keeps them."""
    item = specs.get_item(item_id)
    outputs = [tmp_path / f"{item_id}.pdf", tmp_path / f"{item_id}.png"]
    runs = item_results(item, "runs", [])
    baselines = set(runs.loc[runs["origin"] == "published", "source"])
    assert baselines and baselines <= set(item.baselines)
    labels = {*(s.label for s in item.series if set(s.sources) <= baselines),
              *(r.label for r in item.references if r.source in baselines)}
    assert labels  # the case under test: fig1's DINOv2 series, fig7's reference lines
    fig = render_figure(item, runs, outputs, "mini")
    drawn = {t.get_text() for t in fig.legends[0].get_texts()}
    assert not labels & drawn and all(label in fig._suptitle.get_text().replace("\n", " ") for label in labels)
    published = render_figure(item, item_results(item, "published"), outputs, "published")
    assert labels <= {t.get_text() for t in published.legends[0].get_texts()}
    # fig1's ">1B / <1B data" legends: at a run scale the subtitle says what the labels name there
    regimes = "differ in content, not in size"
    assert (regimes in fig._suptitle.get_text().replace("\n", " ")) == (item_id == "fig1")
    assert regimes not in published._suptitle.get_text().replace("\n", " ")


def test_published_tsv_row_order_follows_the_paper(tmp_path):
    outputs = [tmp_path / f"t.{e}" for e in ("tsv", "md", "tex")]
    item = specs.get_item("table8")
    render_table(item, item_results(item, "published"), outputs, "published")
    table = pd.read_csv(outputs[0], sep="\t")
    assert list(table["source"]) == [f"dino7b-full{n}-224" for n in ("1b", "2b", "4b", "8b")]
    assert list(table["Average"]) == [51.02, 53.87, 54.37, 55.24]


def test_an_evaluated_baseline_replaces_its_published_row(tmp_path):
    """DINOv2 ViT-g imported and evaluated (``pretrain.run_sources``): Table 14's 224 px row is the
    measured one (origin run, not marked), its other rows still the paper's (marked †), and
    Fig. 9's first bar is drawn from its alignment score."""
    item = specs.get_item("table14")
    frame = item_results(item, "runs", [_write_vqa(tmp_path, "dinov2-g-224", 0), "results/published/vqa.tsv"])
    table = render_table(item, frame, [tmp_path / f"t.{ext}" for ext in ("tsv", "md", "tex")], "paper")
    table = table.set_index("source")
    # General = (MME / 20 + 3 x 40) / 4 = 42.5, the other categories 40 (the paper: 49.25)
    assert table.loc["dinov2-g-224", "origin"] == "run"
    assert table.loc["dinov2-g-224", "Average"] == pytest.approx((42.5 + 3 * 40) / 4)
    assert table.loc["dinov2-g-378", "origin"] == "published" and table.loc["dinov2-g-378", "Average"] == 47.94
    rows = {r[0]: r for r in _md_rows(tmp_path / "t.md")}
    assert "DINOv2 ViT-g 224" in rows and "DINOv2 ViT-g 378 †" in rows
    table3 = specs.get_item("table3")  # its descriptor columns would say "a run's place in the grid"
    path = tmp_path / "evals" / "dinov2-g-518" / "vqa.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {b: 40.0 for b in VQA_BENCHMARKS}}))
    render_table(table3, item_results(table3, "runs", [path]), [tmp_path / f"t3.{ext}" for ext in ("tsv", "md", "tex")],
                 "paper")
    assert "DINOv2 ViT-g: the released off-the-shelf model, evaluated here." in (tmp_path / "t3.md").read_text()
    fig9 = specs.get_item("fig9")
    path = tmp_path / "evals" / "dinov2-g-224" / "alignment.json"
    path.write_text(json.dumps({"metrics": {"alignment/minilm": 0.031}}))
    (ax,) = render_figure(fig9, item_results(fig9, "runs", [path]), [tmp_path / "f.pdf", tmp_path / "f.png"],
                          "paper", ["minilm"]).axes
    (bars,) = ax.containers
    assert len(bars) == 1 and bars[0].get_x() < 0.5 and round(bars[0].get_y() + bars[0].get_height(), 6) == 0.031


def test_alignment_bars_mark_a_missing_score_without_a_bar(tmp_path):
    """Fig. 9: a missing score is a hollow marker under the bars' floor, not a bar (a hatched
    full-height bar read as a score at the top of the axis); the paper prints no values, so its
    published figure has no bars and no value axis."""
    item = specs.get_item("fig9")
    outputs = [tmp_path / "fig9.pdf", tmp_path / "fig9.png"]
    published = render_figure(item, item_results(item, "published"), outputs, "published", ["llama3.1-8b"])
    (ax,) = published.axes
    assert ax.containers == [] and list(ax.get_yticks()) == [] and len(ax.lines) == 1
    assert len(ax.lines[0].get_xdata()) == len(item.rows)
    scores = [{"source": r.source, "metric": "alignment/minilm", "value": 0.02 + 0.001 * i, "origin": "", "seed": 0}
              for i, r in enumerate(item.rows) if i % 3]
    (ax,) = render_figure(item, pd.DataFrame(scores), outputs, "mini", ["minilm"]).axes
    (bars,) = ax.containers
    assert [round(b.get_y() + b.get_height(), 6) for b in bars] == [s["value"] for s in scores]
    (gap,) = ax.lines
    assert list(gap.get_xdata()) == [i for i in range(len(item.rows)) if not i % 3]
    assert max(gap.get_ydata()) < min(b.get_y() for b in bars)  # under the floor of every bar
    # each score's standard error over captions, where the evaluation measured one, as an error bar
    errors = [{**s, "metric": "se/alignment/minilm", "value": 0.0004} for s in scores]
    (ax,) = render_figure(item, pd.DataFrame(scores + errors), outputs, "mini", ["minilm"]).axes
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = errorbars.lines[2][0].get_segments()
    assert [round(float(s[1][1] - s[0][1]), 6) for s in segments] == [0.0008] * len(scores)
    assert "error bars: 1 se over captions" in ax.get_ylabel() and "axis from 0.0" in ax.get_ylabel()


def test_alignment_bars_name_why_a_run_scale_has_no_number(tmp_path):
    """At a run scale every run of Fig. 9 is an input: a gap is an off-the-shelf encoder the
    config does not evaluate, not a number missing from the paper."""
    item = specs.get_item("fig9")
    scores = [{"source": r.source, "metric": "alignment/minilm", "value": 0.02, "origin": "run", "seed": 0}
              for r in item.rows[1:]]
    (ax,) = render_figure(item, pd.DataFrame(scores), [tmp_path / "f.pdf", tmp_path / "f.png"], "mini",
                          ["minilm"]).axes
    labels = ax.get_legend_handles_labels()[1]
    assert "minilm: n/a, not evaluated at this scale" in labels and not any("source" in lab for lab in labels)


def test_overlay_draws_zero_image_tokens_and_names_missing_points(tmp_path):
    """fig3 at a run scale over the paper's: the control line on this scale's axis, and the
    points neither side has named in the title (twin axes have no gap strip)."""
    from webssl_repro.paper.figures import render_overlay

    item = specs.get_item("fig3")
    inputs = [_write_vqa(tmp_path, run, k) for k, run in enumerate(item.runs) if run != "clip7b-full2b-224"]
    blind = tmp_path / "controls" / "blind" / "vqa.json"
    blind.parent.mkdir(parents=True)
    blind.write_text(json.dumps({"metrics": {b: 20.0 * (20 if b == "mme" else 1) for b in VQA_BENCHMARKS}}))
    fig = render_overlay("fig3", "mini", [*inputs, blind], tmp_path / "o.png", "results/published")
    ax = fig.axes[0]
    (control,) = [line for line in ax.lines if line.get_label() == "VQA probe on zero image tokens"]
    assert list(control.get_ydata()) == [20.0, 20.0]
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "No number from mini: CLIP 7B." in title and "No number from paper" not in title
