"""Answers that ignore the image, per classic task (uniform, position prior): hand cases,
optimality against brute force, the pixels they are scored on, and where they appear (DAG
inputs, tables, check)."""
import json

import pandas as pd
import pytest
import torch

from webssl_repro.evaluate.classic import depth_range
from webssl_repro.evaluate.depth import RMSE, DepthRange
from webssl_repro.evaluate.no_image import (PRIOR_GRID, best_class_top1, best_depth, class_answers, depth_answers,
                                            depth_prior)
from webssl_repro.evaluate.segmentation import IGNORE_INDEX, IoU
from webssl_repro.metrics import NO_IMAGE


def test_top1_is_the_most_common_class_share():
    assert best_class_top1([torch.tensor(c) for c in (0, 1, 1, 2)]) == (50.0, 1)


OPEN = DepthRange(1e-3, 20.0)  # the bins' range: scored strictly inside


def _maps(*maps):
    return lambda: iter(maps)


def test_miou_by_hand_and_best_of_every_class():
    """Val pixels: class 0 x2, class 1 x4, class 2 x1, one ignored. All 1s: IoU_1 = 4/7, the two
    other classes held score 0, so the mean over the 3 classes is 4/21."""
    maps = [torch.tensor([[0, 0], [1, IGNORE_INDEX]]), torch.tensor([[1, 1], [1, 2]])]
    answers = class_answers(_maps(*maps), _maps(*maps), n_classes=4)
    miou, best = answers["uniform"]
    assert best == 1 and miou == pytest.approx(100 * 4 / 21)

    def one_class(c: int) -> float:
        iou = IoU(4)
        for m in maps:
            iou.add(torch.full_like(m, c), m)
        return 100 * iou.mean()

    assert miou == pytest.approx(max(one_class(c) for c in range(4)))


def test_position_prior_learns_where_each_class_is():
    """Train maps with class 1 on the left half and 2 on the right (a different size from val's):
    the prior labels val's halves exactly (100 mIoU) where one class scores 25."""
    train = [torch.cat([torch.ones(6, 3), 2 * torch.ones(6, 3)], dim=1).long()] * 2
    val = torch.cat([torch.ones(4, 8), 2 * torch.ones(4, 8)], dim=1).long()
    answers = class_answers(_maps(*train), _maps(val), n_classes=3)
    assert answers["position"][0] == pytest.approx(100.0) and answers["position"][1] == [1, 2]
    assert answers["uniform"][0] == pytest.approx(25.0)


def _prior_rmse(train, val: torch.Tensor) -> float:
    return depth_answers(_maps(*train), _maps(val), OPEN)["position"][0]


def test_depth_position_prior_is_the_mean_at_each_place():
    """Depth growing down the rows, as on a ground plane: the prior is the train maps' mean at each
    place; a place with no scored pixel gets the overall mean; val's RMSE by hand."""
    rows = torch.arange(PRIOR_GRID, dtype=torch.float64)[:, None].expand(PRIOR_GRID, PRIOR_GRID) / 8 + 1
    train = [rows - 0.5, rows + 0.5]
    assert _prior_rmse(train, rows) == pytest.approx(0.0, abs=1e-9)
    assert _prior_rmse(train, rows + 1.0) == pytest.approx(1.0)
    sky = [t.clone() for t in train]
    for t in sky:
        t[:8] = 20.0  # never scored: the prior falls back to the overall mean of what is
    fallback = float(torch.cat([t[8:].flatten() for t in train]).mean())
    val = torch.full((PRIOR_GRID, PRIOR_GRID), fallback)
    val[8:] = rows[8:]
    assert _prior_rmse(sky, val) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="no training depth pixel"):
        depth_prior(_maps(torch.full((4, 4), 20.0)), OPEN)


def _per_image_rmse(maps, valid, c: float) -> float:
    acc = RMSE()
    for d, v in zip(maps, valid):
        acc.add(torch.full_like(d, c)[None], d[None], v[None])
    return acc.value()


def test_depth_constant_beats_every_other_constant():
    """Per-image RMSEs averaged weigh images, not pixels: with one large near image and two small
    far ones the optimum sits near the far ones (~9 m), far from the pixel mean (~1.7 m); the
    search must find the grid's minimum (to its spacing)."""
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(h, h, generator=gen) * s + o for h, s, o in ((32, 0.2, 1.4), (2, 0.5, 9.0), (2, 0.5, 10.0))]
    rmse, c = depth_answers(_maps(*maps), _maps(*maps), OPEN)["uniform"]
    valid = [torch.ones_like(d, dtype=torch.bool) for d in maps]
    assert rmse == pytest.approx(_per_image_rmse(maps, valid, c), rel=1e-12)
    grid = torch.linspace(0.5, 12.0, 2301)
    brute = min(_per_image_rmse(maps, valid, float(g)) for g in grid)
    assert rmse <= brute + 1e-9 and rmse == pytest.approx(brute, abs=1e-4)
    pixel_mean = float(torch.cat([d.flatten() for d in maps]).mean())
    assert 8.5 < c < 10.5 and rmse < _per_image_rmse(maps, valid, pixel_mean) - 2.0


def test_depth_scores_only_the_probe_pixels():
    """A pixel at the range's top (the mini world's sky at 20 m) or outside the Eigen crop is not
    scored, as in ``classic.depth``: adding them changes nothing."""
    inside = torch.full((480, 640), 3.0)
    inside[:240] = 5.0
    def uniform(d: torch.Tensor, crop: bool) -> tuple[float, float]:
        return depth_answers(_maps(inside), _maps(d), OPEN, crop)["uniform"]

    plain = uniform(inside, crop=True)
    sky = inside.clone()
    sky[:10] = 20.0  # rows 0-9: above the crop's first row (45) and at the range's top
    sky[:, :41] = 10.0  # left of the crop's first column: in range, out of the crop
    assert uniform(sky, crop=True) == pytest.approx(plain)
    assert uniform(sky, crop=False)[0] > plain[0] + 0.1
    with pytest.raises(ValueError, match="no depth pixel"):
        best_depth(_maps(torch.full((4, 4), 20.0)), OPEN)


def test_a_range_found_in_the_data_is_the_training_maps():
    """max_depth null: the top is the training maps' deepest pixel (mini-web's sky at 20 m), never
    val's, which would leak into the head's bins; pixels at or past it are not scored, as with a
    max_depth set in advance (DINOv2's NYUd mask)."""
    train = [torch.tensor([[2.0, 20.0]]), torch.tensor([[3.0, 4.0]])]
    found = depth_range({"max_depth": None}, iter(train))
    assert (found.low, found.high) == (1e-3, 20.0) and str(found) == "(0.001, 20)"
    val = torch.tensor([[0.0, 3.0, 20.0, 25.0]])
    assert found.scored(val).tolist() == [[False, True, False, False]]
    assert depth_range({"max_depth": None}, iter([torch.tensor([[2.0, 7.0]])])).high == 7.0  # val's 25 m unread
    assert depth_range({"max_depth": 10.0}, iter([])).high == 10.0  # the maps are not read


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    from webssl_repro.data.stages import build_evalset

    root = tmp_path_factory.mktemp("constant_sets")
    sizes = {"size": 64, "classification": {"train": 32, "val": 24}, "segmentation": {"train": 8, "val": 8},
             "depth": {"train": 8, "val": 8}}
    paths = {t: str(root / f"{t}.json") for t in ("classification", "segmentation", "depth")}
    for task, path in paths.items():
        build_evalset(task, sizes, path)
    return paths


def test_cli_writes_the_answers_as_a_classic_result(tiny_sets, tmp_path):
    """``webssl-repro classic-no-image``: the five classic metrics, read back as source
    ``no_image``, each metric the better of the two answers; NYUd's deepest pixel (sky) bounds
    the range when max_depth is null."""
    from webssl_repro.cli import main
    from webssl_repro.evaluate.no_image import classic_reference
    from webssl_repro.paper.results import eval_rows

    out = tmp_path / "results/mini/controls/no_image/classic.json"
    args = ["classic-no-image", "--eval-json", json.dumps({"scale": "mini"}), "--out", str(out), "--data",
            *(tiny_sets[t] for t in ("classification", "segmentation", "depth"))]
    assert main(args) == 0
    written = json.loads(out.read_text())
    expected = {k: v for k, v in classic_reference(tiny_sets).items() if not k.startswith("_")}
    assert written["metrics"] == pytest.approx(expected) and written["run"] == NO_IMAGE
    assert 0 < written["metrics"]["nyud_lin1"] < 20 and written["metrics"]["ade20k_ms"] == expected["ade20k_linear"]
    rows = eval_rows(out)
    assert {r["source"] for r in rows} == {NO_IMAGE} and {r["origin"] for r in rows} == {NO_IMAGE}
    details = written["details"]
    assert written["metrics"]["nyud_lin1"] == min(details["uniform"]["nyud"], details["position_prior"]["nyud"])
    assert written["metrics"]["ade20k_linear"] == max(details["uniform"]["ade20k"], details["position_prior"]["ade20k"])
    capped = classic_reference(tiny_sets, {"depth": {"max_depth": 5.0}})
    assert capped["_uniform"]["depth_m"] < 5.0 and capped["_uniform"]["nyud"] < details["uniform"]["nyud"]


def test_dag_reads_the_answers_where_classic_runs(tmp_path):
    from webssl_repro.workflow import Plan, shipped_plan

    plan = shipped_plan("mini")
    path = f"{plan.results}/controls/{NO_IMAGE}/classic.json"
    assert plan.no_image_answers() == [path]
    for item in ("table3", "table7", "table9", "fig7"):
        assert path in plan.item_inputs(item), item
    assert path not in plan.item_inputs("table6") and path in plan.check_inputs()
    no_classic = Plan({**plan.config, "stages": ["data", "pretrain", "vqa"], "items": ["table6"]})
    assert no_classic.no_image_answers() == [] and path not in no_classic.check_inputs()
    published = shipped_plan("published")
    assert not any(NO_IMAGE in p for p in published.item_inputs("table7") + published.check_inputs())


def _results(values: dict[str, float], constant: dict[str, float]) -> pd.DataFrame:
    rows = [{"source": s, "metric": m, "value": v, "origin": "run", "seed": 0}
            for s, by_metric in values.items() for m, v in by_metric.items()]
    rows += [{"source": NO_IMAGE, "metric": m, "value": v, "origin": NO_IMAGE, "seed": 0}
             for m, v in constant.items()]
    return pd.DataFrame(rows)


def test_table_marks_numbers_no_better_than_an_answer_without_the_image(tmp_path):
    """Higher-is-better cells at or under the bar and RMSE cells at or over it get ‡ (a tie is
    not better); the note counts them and gives the bars."""
    from webssl_repro.paper import specs
    from webssl_repro.paper.tables import render_table

    item = specs.get_item("table7")
    runs = [r.source for r in item.rows]
    constant = {"in1k_linear": 6.25, "ade20k_linear": 4.14, "ade20k_ms": 4.14, "nyud_lin1": 3.1, "nyud_lin4": 3.1}
    values = {runs[0]: {"in1k_linear": 12.0, "ade20k_linear": 4.14, "ade20k_ms": 4.0, "nyud_lin1": 2.5,
                        "nyud_lin4": 3.3}}
    outs = [tmp_path / f"t.{e}" for e in ("tsv", "md", "tex")]
    render_table(item, _results(values, constant), outs, "mini")
    md = outs[1].read_text()
    first = next(line for line in md.splitlines() if line.startswith(f"| {item.rows[0].label} "))
    cells = [c.strip() for c in first.strip("|").split("|")][1:]
    assert cells == ["12.00", "4.14‡", "4.00‡", "2.500", "3.300‡"]
    assert "3 of this table's 5 numbers of runs are marked" in md and "NYUd lin.1 (RMSE) 3.1" in md
    assert r"4.14$^\ddagger$" in outs[2].read_text()
    plain = [tmp_path / f"p.{e}" for e in ("tsv", "md", "tex")]
    render_table(item, _results(values, {}), plain, "mini")
    assert "‡" not in plain[1].read_text()


def test_check_counts_the_runs_that_beat_the_answer_without_the_image(tmp_path):
    from webssl_repro.paper.check import no_image_answers, no_image_note, runs_frame

    paths = []
    for run, top1, rmse in (("dino1b-full2b-224", 12.0, 3.5), ("dino2b-full2b-224", 5.0, 2.0)):
        path = tmp_path / "evals" / run / "classic.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"metrics": {"in1k_linear": top1, "nyud_lin1": rmse}}))
        paths.append(path)
    constant = tmp_path / "controls" / NO_IMAGE / "classic.json"
    constant.parent.mkdir(parents=True)
    constant.write_text(json.dumps({"metrics": {"in1k_linear": 6.25, "nyud_lin1": 3.1}}))
    note = no_image_note(runs_frame(paths), no_image_answers([*paths, constant]))
    assert "IN-1k lin. (top-1) 1 of 2 (without the image 6.25)" in note
    assert "NYUd lin.1 (RMSE) 1 of 2 (without the image 3.1)" in note
    assert no_image_note(runs_frame(paths), no_image_answers(paths)) == ""


def _vqa_json(path, average, se=None, scale=1.0):
    """A VQA result with every benchmark at ``average`` (MME at the same percent) and, where given,
    the standard errors as the VQA stage writes them (details ``<metric>/se``)."""
    from webssl_repro.metrics import CATEGORY_COLUMNS, VQA_BENCHMARKS

    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {b: average * (20.0 if b == "mme" else 1.0) * scale for b in VQA_BENCHMARKS}
    details = {f"{m}/se": se for m in CATEGORY_COLUMNS} if se is not None else {}
    path.write_text(json.dumps({"metrics": metrics, "details": details}))
    return path


def test_vqa_numbers_must_beat_zero_image_tokens_by_two_standard_errors(tmp_path):
    """Zero image tokens answer 24.84 (se 0.5). A run at 26.0 with se 1.0 is within 2 x
    hypot(1.0, 0.5) = 2.24 of it, so marked; 28.0 is not; with no errors a strict tie is."""
    from webssl_repro.paper import specs
    from webssl_repro.paper.results import item_results
    from webssl_repro.paper.tables import render_table

    item = specs.get_item("table15")
    runs = [r.source for r in item.rows]
    blind = _vqa_json(tmp_path / "controls" / "blind" / "vqa.json", 24.84, se=0.5)
    inputs = [_vqa_json(tmp_path / "evals" / run / "vqa.json", value, se=1.0)
              for run, value in zip(runs, (26.0, 28.0, 24.84))]
    frame = item_results(item, "runs", [*inputs, blind])
    assert set(frame.loc[frame["source"] == NO_IMAGE, "origin"]) == {NO_IMAGE}
    outs = [tmp_path / f"t.{e}" for e in ("tsv", "md", "tex")]
    table = render_table(item, frame, outs, "mini").set_index("source")
    assert NO_IMAGE not in table.index  # the control is a bar, not a row
    md = outs[1].read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| Web-DINO")}
    first, second, third = (rows[r.label] for r in item.rows)
    assert first[-1] == "26.00‡" and second[-1] == "28.00" and third[-1] == "24.84‡"
    assert "zero image tokens" in md and "Average 24.84" in md
    # the benchmarks carry no errors here: 26 beats 24.84 strictly (MMB), a tie does not
    assert first[2] == "26.00" and third[2] == "24.84‡"
    assert "18 of this table's 51 numbers of runs are marked" in md  # the first's Average, all 17 of the third's


def test_dag_reads_zero_image_tokens_beside_vqa_items_where_the_controls_run():
    from webssl_repro.workflow import Plan, shipped_plan

    plan = shipped_plan("mini")
    blind = plan.control_path("blind")
    assert blind in plan.item_inputs("table6") and blind in plan.item_inputs("fig3")
    assert blind not in plan.item_inputs("table7")  # classic only
    off = Plan({**plan.config, "evaluate": {**plan.config["evaluate"],
                                            "vqa": {**plan.config["evaluate"]["vqa"], "controls": False}}})
    assert blind not in off.item_inputs("table6")


def test_check_reads_the_classic_answers_beside_the_vqa_control(tmp_path):
    from webssl_repro.paper.check import no_image_answers

    blind = _vqa_json(tmp_path / "controls" / "blind" / "vqa.json", 24.0)
    constant = tmp_path / "controls" / NO_IMAGE / "classic.json"
    constant.parent.mkdir(parents=True)
    constant.write_text(json.dumps({"metrics": {"in1k_linear": 6.25}}))
    assert no_image_answers([blind, constant]) == {"in1k_linear": 6.25}
