"""What a user sees when a config or a command line is off: the messages name the key and the
alternatives, the plan's checks (sizes, warm-ups, run sources, profile resources) stop the dry
run, and its cost summary counts what will really be trained."""
import copy
import dataclasses
import json
import re

import pytest
import yaml

from conftest import REPO, snakemake
from webssl_repro import cli
from webssl_repro.config import ConfigError, config_origin, load_config, load_configs, validate_config
from webssl_repro.models.arch import arch_for
from webssl_repro.paper import specs
from webssl_repro.resources import encoder_params
from webssl_repro.workflow import Plan


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / "config/paper.yaml")


def _with(cfg, **changes):
    out = copy.deepcopy(cfg)
    out.update(changes)
    return out


def _paper_dry_run(workflow_dir, cfg, *targets) -> str:
    """``snakemake -n -p targets`` over config/paper.yaml with ``cfg``'s pretrain section (its run_sources)
    laid over it as a user's overlay file; its stdout, once it has succeeded."""
    (workflow_dir / "mine.yaml").write_text(yaml.safe_dump({"pretrain": cfg["pretrain"]}))
    proc = snakemake(workflow_dir, "-n", "-p", *targets, "--configfile", "config/paper.yaml", "mine.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_unknown_item_is_a_config_error_listing_every_item():
    cfg = _with(load_config(REPO / "config/mini.yaml"), items=["fig8", "fig2", "table99"])
    with pytest.raises(ConfigError, match=r"items: unknown paper item\(s\) fig2, table99; known: table2, .*"
                                          r"table15, fig1, .*fig7, fig8, fig9$"):
        Plan(cfg).items


def test_config_origin_names_the_files_and_the_command_line_keys():
    assert config_origin([]) == "config/mini.yaml"
    assert config_origin(["config/paper.yaml", "my.yaml"], {"seeds": "[0,1]", "items": "[fig3]"}) == \
        "config/paper.yaml, my.yaml with --config items, seeds"


def test_cost_line_counts_every_seed_and_no_pretraining_for_imported_runs(paper):
    base = Plan(paper)
    hours = base.gpu_hours()
    assert base.cost_line() == f"all: 30 runs, {hours:,.0f} estimated pretraining GPU-hours"
    seeded = Plan(_with(paper, seeds=[0, 1, 2]))
    assert seeded.cost_line().startswith("all: 90 runs, ") and seeded.gpu_hours() == pytest.approx(3 * hours)
    fig3 = [r for r in specs.get_item("fig3").runs]
    assert seeded.cost_line("fig3").startswith(f"fig3: {3 * len(fig3)} runs, ")
    run = "dino2b-heavy2b-224"
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": f"facebook/webssl-{run}", "path": "/ckpt/x"}}
    imported = Plan(cfg)
    assert imported.cost_line().startswith("all: 30 runs (1 imported), ")
    assert imported.gpu_hours() == pytest.approx(hours - base.pretrain_resources(run).gpu_hours)
    assert run not in imported.runs_by_layout(True) + imported.runs_by_layout(False)


def test_the_dry_run_says_when_jobs_run_without_gpus(paper):
    """The paper config with ``gpus_per_node: 0`` would train ViT-7B on CPU nodes: the dry
    run's cost summary says so instead of "0 GPUs/node" and 0 GPU-hours alone."""
    assert Plan(paper).target_message().endswith(f"({paper['resources']['gpus_per_node']} GPUs/node)")
    cfg = copy.deepcopy(paper)
    cfg["resources"].update(gpus_per_node=0, eval_gpus=0)
    message = Plan(cfg).target_message()
    assert message.startswith("all: 30 runs, 0 estimated pretraining GPU-hours (resources.gpus_per_node is 0: "
                              "every pretraining and evaluation job runs on CPUs)"), message


def test_a_release_outside_the_grid_is_imported_for_the_evaluations_asked_of_it(paper, workflow_dir):
    """Evaluating a released checkpoint alone (README): one the grid has no run of (ViT-300M on
    lightly filtered data, MAE ViT-700M) is imported when one of its evaluations is asked for;
    `all` neither builds nor counts it."""
    cfg = copy.deepcopy(paper)
    extra = ("dino300m-light2b-224", "mae700m-full2b-224")
    cfg["pretrain"]["run_sources"] = {r: {"checkpoint": f"facebook/webssl-{r}", "path": str(workflow_dir / f"{r}.pth")}
                                      for r in extra}
    for r in extra:
        (workflow_dir / f"{r}.pth").write_bytes(b"")  # a local copy must be there (only the dry run looks)
    plan, base = Plan(cfg), Plan(paper)
    assert set(plan.runs) - set(base.runs) == set(extra) and plan.item_runs == base.item_runs
    assert plan.cost_line() == base.cost_line()
    assert plan.import_resources()["mem_mb"] == 8000  # ViT-700M: 3 fp32 copies are under 8 GB
    targets = [f"results/paper/evals/{r}/{kind}.json" for r in extra for kind in ("classic", "alignment")]
    stdout = _paper_dry_run(workflow_dir, cfg, *targets)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", stdout, re.M))
    assert (jobs["import_released"], jobs["classic"], jobs["alignment"]) == ("2", "2", "2"), stdout[-2000:]


def test_an_imported_off_the_shelf_dinov2_is_evaluated_where_the_paper_shows_it(paper, workflow_dir):
    """DINOv2 ViT-g (facebook/dinov2-giant) imported as ``dinov2-g-224``: Fig. 9's first bar, Fig. 1's
    DINOv2 point and Table 14 read its evaluations; the baselines not imported stay the paper's
    printed numbers, and a checkpoint of another model is refused by its key."""
    from webssl_repro.releases import OFF_THE_SHELF

    assert set(OFF_THE_SHELF) <= set(specs.BASELINES)  # each importable one is a row of the paper's
    run, eval_path = "dinov2-g-224", "results/paper/evals/dinov2-g-224/{}.json"
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": "facebook/dinov2-giant"}}
    cfg["items"] = [*paper["items"], "table14"]
    plan, base = Plan(cfg), Plan(_with(paper, items=cfg["items"]))
    assert "table14" in plan.items and "table14" in base.skipped_items and "none imported" in base.skipped_items["table14"]
    assert eval_path.format("alignment") in plan.item_inputs("fig9")
    assert eval_path.format("alignment") not in base.item_inputs("fig9")
    assert eval_path.format("vqa") in plan.item_inputs("fig1")
    table14 = plan.item_inputs("table14")  # SigLIP, MetaCLIP, … and DINOv2 at 378/518 from the paper
    assert table14 == [eval_path.format("vqa"), "results/published/vqa.tsv"]
    assert not any("dinov2" in p for p in plan.item_inputs("table3"))  # Table 3's DINOv2 row is 518 px
    assert plan.runs[-1] == run and not plan.trained(run)
    assert plan.cost_line() == base.cost_line().replace("30 runs,", "31 runs (1 imported),")
    assert plan.cost_line("fig9").startswith("fig9: 8 runs (1 imported), ")
    assert plan.import_resources()["mem_mb"] == -(-12 * encoder_params("dino", paper["labels"]["sizes"]["1b"], 518)
                                                   // 2**20)
    with pytest.raises(ConfigError, match=r"run_sources.dinov2-g-224.checkpoint: 'facebook/dinov2-large' is not "
                                          r"the checkpoint of dinov2-g-224 \(facebook/dinov2-giant\)"):
        Plan(_with(cfg, pretrain={**cfg["pretrain"], "run_sources": {run: {"checkpoint": "facebook/dinov2-large"}}}))
    with pytest.raises(ConfigError, match=r"run_sources.dinov2-g-512: no released .*'dinov2-g-224', 'dinov2-g-378'"):
        Plan(_with(cfg, pretrain={**cfg["pretrain"], "run_sources": {"dinov2-g-512": {"checkpoint": "x"}}}))
    stdout = _paper_dry_run(workflow_dir, cfg, "fig9")
    assert f"--run {run} --checkpoint facebook/dinov2-giant --allow-download" in stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", stdout, re.M))
    assert (jobs["import_released"], jobs["alignment"]) == ("1", "8"), stdout[-2000:]


def test_an_imported_off_the_shelf_mae_h_is_evaluated_in_tables_3_and_14(paper, workflow_dir):
    """MAE ViT-H (facebook/vit-mae-huge, Web-MAE 700M's architecture) imported as ``mae-h-224``: the MAE
    rows of Table 3 (VQA categories and classic vision) and Table 14 (VQA) read its evaluations."""
    run, eval_path = "mae-h-224", "results/paper/evals/mae-h-224/{}.json"
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": "facebook/vit-mae-huge"}}
    cfg["items"] = [*paper["items"], "table14"]
    plan, base = Plan(cfg), Plan(paper)
    assert plan.item_inputs("table14") == [eval_path.format("vqa"), "results/published/vqa.tsv"]
    assert set(plan.item_inputs("table3")) - set(base.item_inputs("table3")) == {
        eval_path.format("vqa"), eval_path.format("classic")}
    assert plan.item_inputs("fig9") == base.item_inputs("fig9")  # the paper shows no MAE bar
    assert plan.runs[-1] == run and not plan.trained(run)
    # ViT-H's 631M fp32 parameters three times over are 7.2 GB, under the job's 8 GB floor
    assert 3 * 4 * encoder_params("mae", dataclasses.asdict(arch_for("mae", "700m")), 224) < 8000 * 2**20
    assert plan.import_resources()["mem_mb"] == 8000
    with pytest.raises(ConfigError, match=r"run_sources.mae-h-224.checkpoint: 'facebook/vit-mae-large' is not "
                                          r"the checkpoint of mae-h-224 \(facebook/vit-mae-huge\)"):
        Plan(_with(cfg, pretrain={**cfg["pretrain"], "run_sources": {run: {"checkpoint": "facebook/vit-mae-large"}}}))
    stdout = _paper_dry_run(workflow_dir, cfg, eval_path.format("classic"))
    assert f"--run {run} --checkpoint facebook/vit-mae-huge --allow-download" in stdout


def test_an_imported_off_the_shelf_metaclip_h_is_evaluated_in_table_14_only(paper, workflow_dir, tmp_path):
    """MetaCLIP ViT-H (an OpenAI-CLIP tower) imported as ``metaclip-h-224`` from MetaCLIP's open_clip file:
    Table 14's row reads its VQA; Table 3 and Fig. 7 show MetaCLIP ViT-bigG, another model."""
    run, eval_path = "metaclip-h-224", "results/paper/evals/metaclip-h-224/{}.json"
    local = tmp_path / "h14_fullcc2.5b.pt"
    local.write_bytes(b"")  # only its existence is checked at planning time
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": "facebook/metaclip-h14-fullcc2.5b", "path": str(local)}}
    cfg["items"] = [*paper["items"], "table14"]
    plan, base = Plan(cfg), Plan(paper)
    assert plan.item_inputs("table14") == [eval_path.format("vqa"), "results/published/vqa.tsv"]
    assert plan.item_inputs("table3") == base.item_inputs("table3")
    assert plan.item_inputs("fig7") == base.item_inputs("fig7")
    assert plan.runs[-1] == run and not plan.trained(run)
    assert plan.import_resources()["mem_mb"] == 8000  # ViT-H/14's tower three times over is 7.0 GiB
    assert encoder_params("clip", dataclasses.asdict(arch_for("clip", "h14")), 224) == 630_766_080
    stdout = _paper_dry_run(workflow_dir, cfg, eval_path.format("vqa"))
    assert f"--run {run} --checkpoint facebook/metaclip-h14-fullcc2.5b --path {local}" in stdout


def test_metaclip_bigg_is_table_3_s_row_and_fig_7_s_line_and_needs_its_file(paper, tmp_path):
    """MetaCLIP ViT-bigG (``metaclip-g-224``) has no hub repo: imported from a local copy of its open_clip
    file, Table 3's row and Fig. 7's MetaCLIP reference line read its evaluations; without one, the
    config is refused at any scale."""
    run, eval_path = "metaclip-g-224", "results/paper/evals/metaclip-g-224/{}.json"
    local = tmp_path / "G14_fullcc2.5b.pt"
    local.write_bytes(b"")
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": "G14_fullcc2.5b.pt", "path": str(local)}}
    plan, base = Plan(cfg), Plan(paper)
    assert set(plan.item_inputs("table3")) - set(base.item_inputs("table3")) == {
        eval_path.format("vqa"), eval_path.format("classic")}
    assert set(plan.item_inputs("fig7")) - set(base.item_inputs("fig7")) == {eval_path.format("classic")}
    assert plan.import_command(run) == f"--checkpoint G14_fullcc2.5b.pt --path {local}"
    # the 1.84B-parameter tower three times in fp32 is 20.6 GiB
    assert plan.import_resources()["mem_mb"] == -(-3 * 4 * 1_842_777_344 // 2**20) == 21_089
    with pytest.raises(ConfigError, match=r"run_sources.metaclip-g-224: no 'path', and https://\S+/G14_fullcc2.5b.pt "
                                          r"is on no hub to download it from"):
        Plan(_with(cfg, pretrain={**cfg["pretrain"], "run_sources": {run: {"checkpoint": "G14_fullcc2.5b.pt"}}}))


def test_an_imported_off_the_shelf_ijepa_h_is_evaluated_in_tables_3_and_14(paper, workflow_dir):
    """I-JEPA ViT-H (``ijepa-h-224``, a tower without a class token): Table 3's row (VQA categories and
    classic vision) and Table 14's read its evaluations; downloaded at the paper scale."""
    run, eval_path = "ijepa-h-224", "results/paper/evals/ijepa-h-224/{}.json"
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": "facebook/ijepa_vith14_22k"}}
    cfg["items"] = [*paper["items"], "table14"]
    plan, base = Plan(cfg), Plan(paper)
    assert plan.item_inputs("table14") == [eval_path.format("vqa"), "results/published/vqa.tsv"]
    assert set(plan.item_inputs("table3")) - set(base.item_inputs("table3")) == {
        eval_path.format("vqa"), eval_path.format("classic")}
    assert plan.import_resources()["mem_mb"] == 8000
    stdout = _paper_dry_run(workflow_dir, cfg, eval_path.format("classic"))
    assert f"--run {run} --checkpoint facebook/ijepa_vith14_22k --allow-download" in stdout


def test_imported_off_the_shelf_siglip_towers_are_evaluated_in_tables_3_and_14(paper, workflow_dir):
    """SigLIP and SigLIP 2 SO400M/14 (``siglip-so400m-384``, ``siglip2-so400m-224``): Table 3's rows and Table
    14's read their evaluations; downloaded at the paper scale from their pinned transformers repos."""
    runs = {"siglip-so400m-384": "google/siglip-so400m-patch14-384",
            "siglip2-so400m-224": "google/siglip2-so400m-patch14-224"}
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": checkpoint} for run, checkpoint in runs.items()}
    cfg["items"] = [*paper["items"], "table14"]
    plan, base = Plan(cfg), Plan(paper)
    evals = {run: f"results/paper/evals/{run}/{{}}.json" for run in runs}
    assert plan.item_inputs("table14") == [*(evals[run].format("vqa") for run in runs), "results/published/vqa.tsv"]
    assert set(plan.item_inputs("table3")) - set(base.item_inputs("table3")) == {
        evals[run].format(kind) for run in runs for kind in ("vqa", "classic")}
    assert plan.import_resources()["mem_mb"] == 8000  # SO400M/14's tower three times over is 4.6 GiB
    stdout = _paper_dry_run(workflow_dir, cfg, *(evals[run].format("classic") for run in runs))
    for run, checkpoint in runs.items():
        assert f"--run {run} --checkpoint {checkpoint} --allow-download" in stdout
    cfg["pretrain"]["run_sources"]["siglip-so400m-384"]["path"] = "/ckpt/siglip-so400m-patch14-384"
    with pytest.raises(FileNotFoundError, match=r"/ckpt/siglip-so400m-patch14-384 does not exist \(a local copy of "
                                                r"google/siglip-so400m-patch14-384: a transformers model directory\)$"):
        Plan(cfg).import_inputs("siglip-so400m-384")


#: config/paper.yaml's hub pins, by where they are
PAPER_PINS = {("data", "filter", "revision"): "data.filter.model",
              ("evaluate", "vqa", "language_model_revision"): "evaluate.vqa.language_model",
              ("evaluate", "alignment", "lm_revisions", "llama3.1-8b"): "evaluate.alignment.lm_paths.llama3.1-8b",
              ("evaluate", "alignment", "lm_revisions", "llama3.1-70b"): "evaluate.alignment.lm_paths.llama3.1-70b"}


def test_paper_pins_are_commits(paper):
    for where in PAPER_PINS:
        value = paper
        for key in where:
            value = value[key]
        assert re.fullmatch(r"[0-9a-f]{40}", value), (where, value)


@pytest.mark.parametrize("kept", [None, *PAPER_PINS])
def test_an_overlay_with_local_copies_sets_paper_yaml_s_pins_to_null(tmp_path, kept):
    """Local copies of the four pinned models, laid over config/paper.yaml: with each pin set to null the plan
    holds; a pin left beside its copy stops the dry run, naming both keys."""
    copies = {name: tmp_path / name for name in ("smol", "llama3", "l8", "l70")}
    for folder in copies.values():
        folder.mkdir()
    overlay = {"data": {"filter": {"model": str(copies["smol"]), "revision": None}},
               "evaluate": {"vqa": {"language_model": str(copies["llama3"]), "language_model_revision": None},
                            "alignment": {"lm_paths": {"llama3.1-8b": str(copies["l8"]),
                                                       "llama3.1-70b": str(copies["l70"])},
                                          "lm_revisions": {"llama3.1-8b": None, "llama3.1-70b": None}}}}
    if kept is not None:
        section = overlay
        for key in kept[:-1]:
            section = section[key]
        del section[kept[-1]]
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(overlay))
    cfg = load_configs([REPO / "config/paper.yaml", tmp_path / "local.yaml"])
    if kept is None:
        validate_config(cfg)
        assert "lm_revisions" not in json.loads(Plan(cfg).language_features_json("llama3.1-70b"))
        return
    revision_key = ".".join(kept[:3]) if kept[1] == "alignment" else ".".join(kept)
    with pytest.raises(ConfigError, match=rf"{re.escape(revision_key)}: '[0-9a-f]{{40}}' pins a hub id's commit, but "
                                          rf"{re.escape(PAPER_PINS[kept])} is a local directory"):
        Plan(cfg)


def test_import_resources_fit_the_largest_imported_encoder(paper):
    assert Plan(paper).import_resources() == {}  # nothing imported
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {r: {"checkpoint": f"facebook/webssl-{r}"}
                                      for r in ("dino2b-heavy2b-224", "dino7b-full8b-518")}
    params = encoder_params("dino", cfg["labels"]["sizes"]["7b"], 518)
    assert 6e9 < params < 7e9
    res = Plan(cfg).import_resources()
    assert res == {"mem_mb": -(-12 * params // 2**20), "cpus_per_task": 8, "runtime": 120}
    mini = load_config(REPO / "config/mini.yaml")
    assert Plan(mini).import_resources() == {}  # no GPU nodes: the machine's defaults


def test_in1k_epochs_are_the_generated_stand_ins_size():
    """labels.in1k_images defaults to the generated ImageNet-1k stand-in's size (not ImageNet's
    1,281,167: 80k mini steps), and a different number beside a generated corpus is refused."""
    mini = load_config(REPO / "config/mini.yaml")
    stated = Plan(mini).run_config("dino1b-in1k-224")["samples_seen"]
    cfg = copy.deepcopy(mini)
    del cfg["labels"]["in1k_images"]
    assert Plan(cfg).run_config("dino1b-in1k-224")["samples_seen"] == stated == 2 * 1024
    cfg["labels"]["in1k_images"] = 1281167
    with pytest.raises(ConfigError, match=r"labels.in1k_images is 1281167, but data.in1k generates 1024 images"):
        Plan(cfg)


def test_hires_samples_follow_the_batch_the_fine_tune_trains_with(paper):
    """pretrain.hires without batch_size takes the method's (hires_recipe's): samples seen are
    steps x that batch, not 0 (which failed on a warm-up "not shorter than 0 steps")."""
    cfg = copy.deepcopy(paper)
    del cfg["pretrain"]["hires"]["dino"]["batch_size"]
    config = Plan(cfg).run_config("dino7b-full8b-518")
    assert config["samples_seen"] == 20000 * config["recipe"]["batch_size"] == 20000 * cfg["pretrain"]["dino"]["batch_size"]
    del cfg["pretrain"]["dino"]["batch_size"]
    with pytest.raises(ConfigError, match=r"pretrain.hires.dino.batch_size: dino7b-full8b-518 counts its samples"):
        Plan(cfg).run_config("dino7b-full8b-518")


@pytest.mark.parametrize("method", ["mae", "clip"])
def test_a_mae_or_clip_fine_tune_takes_its_own_hires_keys(paper, method):
    """pretrain.hires holds each method's keys: Web-DINO's base_lr (App. C) once reached MAE's and
    CLIP's recipes, whose configs refuse it when the job starts; their fine-tune keeps its 224 px
    batch and lr unless hires.{method} sets them."""
    from webssl_repro.methods.clip import RECIPE_EXTRAS, ClipConfig
    from webssl_repro.methods.mae import MaeConfig

    config_class = {"mae": MaeConfig, "clip": ClipConfig}[method]
    run = f"{method}2b-full2b-378"
    recipe = Plan(paper).run_config(run)["recipe"]
    assert "base_lr" not in recipe and recipe["lr"] == paper["pretrain"][method]["lr"]
    config_class.from_mapping({k: v for k, v in recipe.items() if k not in RECIPE_EXTRAS})
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["hires"][method] = {"lr": 1.0e-5, "batch_size": 1024}
    config = Plan(cfg).run_config(run)
    assert (config["recipe"]["lr"], config["recipe"]["batch_size"]) == (1.0e-5, 1024)
    assert config["samples_seen"] == 20000 * 1024
    assert Plan(cfg).run_config("dino2b-full2b-378")["recipe"]["base_lr"] == 1.0e-5  # dino's own key, unchanged


@pytest.mark.parametrize("key, change, message", [
    ("eval_gpus", {}, r"resources.eval_gpus is 0 \(unset: 0\), but evaluate.vqa.language_model 'meta-llama/"),
    ("eval_gpus", {"stages": ["data", "pretrain", "classic", "alignment"]},
     r"resources.eval_gpus .* but evaluate.alignment.language_models \['llama3.1-8b', 'llama3.1-70b'\] runs"),
    ("eval_gpus", {"_unset": "language_model"},
     r"resources.eval_gpus is 0 \(unset: 0\), but evaluate.vqa.language_model 'meta-llama/Meta-Llama-3-8B-Instruct'"),
    ("filter_gpus", {}, r"resources.filter_gpus is 0 \(unset: 0\), but data.filter \(backend mllm on cuda\) runs on GPUs"),
])
def test_gpu_jobs_without_gpus_are_refused_at_the_dry_run(paper, key, change, message):
    """On GPU nodes, a real LM or the MLLM filter on CUDA planned with 0 GPUs would be submitted as
    a CPU job (gpu=0) and fail, or crawl, once it starts."""
    cfg = copy.deepcopy(paper)
    if change.pop("_unset", None):  # the job's default LM is Llama-3, not the mini "tiny"
        del cfg["evaluate"]["vqa"]["language_model"]
    cfg.update(change)
    del cfg["resources"][key]
    with pytest.raises(ConfigError, match=message):
        Plan(cfg)
    cfg["resources"].update(gpus_per_node=0, eval_gpus=0)  # a CPU-only copy: every job runs on CPUs, and says so
    Plan(cfg)


def test_the_dry_run_says_when_gpu_runs_train_on_the_generated_corpus(paper):
    cfg = copy.deepcopy(paper)
    del cfg["data"]["shards"]
    cfg["scale"] = "mycluster"
    assert Plan(cfg).target_message().endswith("(8 GPUs/node; data.shards unset: the runs train on the generated "
                                               "mini-web corpus)")
    assert "data.shards unset" not in Plan(paper).target_message()


def test_eval_gpus_beyond_one_node_is_refused(paper):
    cfg = copy.deepcopy(paper)
    cfg["resources"]["eval_gpus"] = 16
    with pytest.raises(ConfigError, match=r"resources.eval_gpus: 16 GPUs, .* resources.gpus_per_node is 8"):
        Plan(cfg)
    cfg["resources"].update(eval_gpus=8, lm_gpus={"llama3.1-70b": 9})
    with pytest.raises(ConfigError, match=r"resources.lm_gpus.llama3.1-70b: 9 GPUs, .* resources.gpus_per_node is 8"):
        Plan(cfg)


def test_unknown_language_model_name_is_refused_at_the_dry_run(paper):
    cfg = copy.deepcopy(paper)
    alignment = cfg["evaluate"]["alignment"]
    alignment["language_models"] = ["llama3.1-8b", "llama3.1-70B"]  # the second misspelt: no lm_paths key
    with pytest.raises(ConfigError, match=r"language_models: 'llama3.1-70B' is not 'minilm', nor a key of "
                                          r"evaluate.alignment.lm_paths \(llama3.1-8b, llama3.1-70b\)"):
        Plan(cfg)
    alignment["language_models"] = ["llama3.1-8b", "meta-llama/Llama-3.1-70B"]  # a hub id names itself
    assert Plan(cfg).language_models() == ["llama3.1-8b", "meta-llama/Llama-3.1-70B"]
    cfg["resources"]["lm_gpus"] = {"llama3.1-70B": 4}  # misspelt: the 70B model would get the default one GPU
    with pytest.raises(ConfigError, match=r"resources.lm_gpus: 'llama3.1-70B' is not one of evaluate.alignment."
                                          r"language_models \(llama3.1-8b, meta-llama/Llama-3.1-70B\) nor of its "
                                          r"lm_paths \(llama3.1-8b, llama3.1-70b\)"):
        Plan(cfg)
    cfg["resources"]["lm_gpus"] = {"llama3.1-70b": 4}  # an lm_paths key the override left out: kept
    Plan(cfg)
    cfg["resources"]["lm_gpus"] = {"llama3.1-70b": 4, "meta-llama/Llama-3.1-70B": 8}  # one model, which count?
    with pytest.raises(ConfigError, match=r"resources.lm_gpus: 'meta-llama/Llama-3.1-70B': 8, 'llama3.1-70b': 4 are "
                                          r"one language model \(meta-llama/Llama-3.1-70B\) set differently"):
        Plan(cfg)
    cfg["resources"]["lm_gpus"] = {"llama3.1-70b": 4, "meta-llama/Llama-3.1-70B": 4}  # the same: no question
    Plan(cfg)
    alignment["lm_paths"]["llama70"] = "meta-llama/Llama-3.1-70B"  # two short names of it, pinned apart
    alignment["lm_revisions"] = {"llama3.1-70b": "abc123", "llama70": "def456"}
    with pytest.raises(ConfigError, match=r"evaluate.alignment.lm_revisions: 'llama3.1-70b': 'abc123', 'llama70': "
                                          r"'def456' are one language model"):
        Plan(cfg)
    del alignment["lm_paths"]["llama70"], alignment["lm_revisions"]
    cfg["stages"] = ["data", "pretrain", "vqa"]  # no alignment jobs: nothing to refuse
    alignment["language_models"] = ["llama3.1-70B"]
    Plan(cfg)


def test_data_stage_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "--help"])
    assert exit_.value.code == 0 and "usage: webssl-repro data" in capsys.readouterr().out


def test_a_size_that_builds_no_vit_stops_the_dry_run(paper):
    """2688 is not divisible by 20 heads: refused by the plan, not by a job on 16 nodes."""
    cfg = copy.deepcopy(paper)
    cfg["labels"]["sizes"]["2b"]["heads"] = 20
    with pytest.raises(ConfigError, match=r"labels.sizes.2b: Arch.width=2688 is not divisible by heads=20"):
        Plan(cfg)


def test_a_runs_missing_label_or_unmaskable_mae_is_named(paper):
    """A missing label stops ``check_run_labels``, which common.smk calls under
    ``stop_on_config_error`` (a rule file's parse printed Python frames); an MAE ratio that masks
    no patch, which was a NaN at step 0, stops the run's config."""
    cfg = copy.deepcopy(paper)
    del cfg["labels"]["sizes"]["1b"]
    with pytest.raises(ConfigError, match=r"labels.sizes has no entry '1b' \(run dino1b-full2b-224\)"):
        Plan(cfg).check_run_labels()
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["mae"]["mask_ratio"] = 0.001  # round(256 x 0.999) keeps all 256 patches
    with pytest.raises(ConfigError, match=r"pretrain.mae.mask_ratio: 0.001 masks none of the 256 patches of run mae1b"):
        Plan(cfg).run_config("mae1b-full2b-224")
    cfg["pretrain"]["mae"]["mask_ratio"] = 0.002  # keeps 255
    assert Plan(cfg).run_config("mae1b-full2b-224")["recipe"]["mask_ratio"] == 0.002


def test_a_size_label_shapes_each_methods_tower_as_released(paper):
    """One ``labels.sizes`` entry serves Web-DINO, CLIP and Web-MAE. Its ``ffn_hidden`` is the
    SwiGLU width; it once gave MAE-1B a GELU MLP of 4096 instead of the released 6144. Its
    ``mae`` section is what MAE's tower changes: MAE-300M's patch 16 beside Web-DINO-300M's 14."""
    from webssl_repro.models.arch import Arch

    cfg = copy.deepcopy(paper)
    cfg["labels"]["sizes"]["1b"]["ffn_hidden"] = 4096
    cfg["labels"]["sizes"]["300m"] = {"width": 1024, "depth": 24, "heads": 16, "patch": 14, "mae": {"patch": 16}}
    cfg["resources"]["nodes"]["300m"] = 4
    validate_config(cfg, "my.yaml")
    plan = Plan(cfg)
    arch = {run: plan.run_config(run)["arch"] for run in
            ("dino1b-full2b-224", "clip1b-full2b-224", "mae1b-full2b-224", "dino300m-full2b-224", "mae300m-full2b-224")}
    assert Arch.from_config(arch["dino1b-full2b-224"]).hidden("swiglu") == 4096
    assert Arch.from_config(arch["clip1b-full2b-224"]).hidden("swiglu") == 4096
    assert Arch.from_config(arch["mae1b-full2b-224"]).hidden("gelu") == 6144  # paper_facts §4.2: gelu 6144
    assert (arch["dino300m-full2b-224"]["patch"], arch["mae300m-full2b-224"]["patch"]) == (14, 16)
    # paper_facts §4.2: webssl-mae300m 0.303B, webssl-dino300m 0.304B (SwiGLU 2736)
    assert encoder_params("mae", arch["mae300m-full2b-224"], 224) / 1e9 == pytest.approx(0.303, abs=5e-4)
    assert encoder_params("dino", arch["dino300m-full2b-224"], 224) / 1e9 == pytest.approx(0.304, abs=5e-4)
    # the cluster estimate sizes MAE-300M by its own 196 patches, not Web-DINO-300M's 256
    at_14 = copy.deepcopy(cfg)
    del at_14["labels"]["sizes"]["300m"]["mae"]
    flops = [p.pretrain_resources("mae300m-full2b-224").train_flops for p in (plan, Plan(at_14))]
    assert 0.7 < flops[0] / flops[1] < 196 / 256

    cfg["labels"]["sizes"]["300m"]["mae"] = {"patch": 16, "heads": 8}
    with pytest.raises(ConfigError, match=r"my.yaml: at key 'labels.sizes.300m.mae'.*'heads' was unexpected"):
        validate_config(cfg, "my.yaml")


@pytest.mark.parametrize("key,value,message", [
    (("pretrain", "dino", "batch_size"), 0, "0 is less than the minimum of 1"),
    (("pretrain", "mae", "batch_size"), -5, "-5 is less than the minimum of 1"),
    (("pretrain", "mae", "mask_ratio"), 0, "0 is less than or equal to the minimum of 0"),
    (("pretrain", "dino", "teacher_temp"), 0.0, "0.0 is less than or equal to the minimum of 0"),
    (("pretrain", "dino", "momentum_teacher"), 1.5, "1.5 is greater than the maximum of 1"),
    (("evaluate", "vqa", "stage2", "micro_batch_size"), 0, "0 is less than the minimum of 1"),
    (("seeds",), [0, 0], "[0, 0] has non-unique elements"),
])
def test_out_of_range_recipe_values_are_named_by_key(paper, key, value, message):
    """A batch size of 0 was a ZeroDivisionError in the run-length arithmetic, a negative one
    blamed the warm-up; duplicate seeds doubled the cost line over one directory; a mask ratio of
    0 left MAE's loss 0/0 (NaN at step 0)."""
    from webssl_repro.config import validate_config

    cfg = copy.deepcopy(paper)
    section = cfg
    for k in key[:-1]:
        section = section.setdefault(k, {})
    section[key[-1]] = value
    with pytest.raises(ConfigError, match=rf"my.yaml: at key '{re.escape('.'.join(key))}': {re.escape(message)}"):
        validate_config(cfg, "my.yaml")


def test_cli_errors_name_the_problem_unquoted(capsys, tmp_path, monkeypatch):
    rc = cli.main(["render", "fig10", "--scale", "published", "--source", "published", "--outputs", str(tmp_path)])
    assert rc == 2
    assert "webssl-repro render: error: unknown paper item 'fig10'; known: table2," in capsys.readouterr().err
    # a lookup that failed deep inside is not passed off as a message: it was 'error: captions'
    rc = cli.main(["evaluate", "alignment", "--run", "x", "--encoder", str(tmp_path), "--out", str(tmp_path / "a.json")])
    assert rc == 2 and "error: evaluate alignment reads the captions eval set" in capsys.readouterr().err

    def lookup(args):
        return {}["llama2"]

    monkeypatch.setattr(cli, "_render", lookup)
    assert cli.main(["render", "fig3", "--scale", "published", "--source", "published", "--outputs", "x"]) == 2
    assert "webssl-repro render: error: KeyError: 'llama2' (a missing key or name)" in capsys.readouterr().err


def test_paper_scale_needs_real_shards():
    """Without ``data.shards`` (or ``data.in1k.shards``) the mini-web generator would stand in
    for MC-2B (ImageNet-1k) under the paper's 7B runs: a misspelt key must stop the dry run."""
    for drop in ("shards", "in1k"):
        config = load_config(REPO / "config/paper.yaml")
        config["data"]["shard" if drop == "shards" else "in1k"] = config["data"].pop(drop)
        if drop == "in1k":
            config["data"]["in1k"] = {"n_images": 1000}
        with pytest.raises(ConfigError, match="'shards' is a required property"):
            validate_config(config, "paper.yaml")


def test_a_size_missing_from_resources_nodes_is_an_error_not_one_node():
    cfg = load_config(REPO / "config/paper.yaml")
    del cfg["resources"]["nodes"]["7b"]
    with pytest.raises(ConfigError, match=r"resources.nodes has no entry for size .7b."):
        Plan(cfg).pretrain_resources("dino7b-full8b-224")


@pytest.mark.parametrize("section,key,value,run,where", [
    ("dino", "warmup_steps", 64, "dino1b-full2b-224", "pretrain.dino.warmup_steps: 64"),
    ("in1k", "warmup_teacher_temp_steps", 100, "dino1b-in1k-224", "pretrain.in1k.dino.warmup_teacher_temp_steps: 100"),
    ("mae", "warmup_iters", 40, "mae1b-full2b-224", "pretrain.mae.warmup_iters: 40"),
    ("train", "warmup_steps", 64, "clip1b-full2b-224", "pretrain.train.warmup_steps: 64"),
])
def test_a_warmup_as_long_as_the_run_is_refused_by_name(section, key, value, run, where):
    """Mini runs of 2048 samples: 64 steps at DINO's batch 32, 32 at MAE's and CLIP's 64."""
    cfg = load_config(REPO / "config/mini.yaml")
    if section == "in1k":  # with a real temperature warm-up (mini's stays flat at 0.04)
        cfg["pretrain"]["in1k"] = {"dino": {key: value, "teacher_temp": 0.07}}
    else:
        cfg["pretrain"].setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=re.escape(where) + r" is not shorter than run " + re.escape(run)):
        Plan(cfg).run_config(run)


def test_a_warmup_left_at_its_default_is_checked_too():
    """A recipe that leaves DINO's teacher-temperature warm-up unset gets DinoConfig's 37,500
    steps: an ImageNet-1k run of 100 epochs (41,705 steps) passes, one of 90 (37,535) too, 80 not."""
    from webssl_repro.recipes import SCHEDULE_DEFAULTS

    cfg = load_config(REPO / "config/paper.yaml")
    cfg["pretrain"].pop("in1k")
    cfg["pretrain"]["dino"]["warmup_steps"] = 20000
    cfg["labels"]["in1k_epochs"] = 90
    Plan(cfg).run_config("dino1b-in1k-224")
    cfg["labels"]["in1k_epochs"] = 80
    with pytest.raises(ConfigError, match=r"pretrain\.dino\.warmup_teacher_temp_steps \(unset: the default\): 37500 "
                                          r"is not shorter than run dino1b-in1k-224, 33,364 steps.*pretrain\.in1k\.dino"):
        Plan(cfg).run_config("dino1b-in1k-224")
    assert SCHEDULE_DEFAULTS["dino"]["warmup_teacher_temp_steps"] == 37500


def test_a_flat_teacher_temperature_has_no_warmup_to_check():
    """Mini keeps the teacher at 0.04 throughout (warmup_teacher_temp == teacher_temp): its
    20-step "warm-up" may outlast a 4-step test run; lifting the end temperature makes it real."""
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["labels"]["samples"]["2b"] = 128  # 4 steps of 32
    cfg["pretrain"]["dino"]["warmup_steps"] = 2
    assert Plan(cfg).run_config("dino1b-full2b-224")["recipe"]["warmup_teacher_temp_steps"] == 20
    cfg["pretrain"]["dino"]["teacher_temp"] = 0.07
    with pytest.raises(ConfigError, match=r"pretrain\.dino\.warmup_teacher_temp_steps: 20 is not shorter"):
        Plan(cfg).run_config("dino1b-full2b-224")


def test_the_dry_run_stops_at_a_warmup_longer_than_its_run(workflow_dir):
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    config["pretrain"]["in1k"] = {"dino": {"warmup_steps": 500}}
    (workflow_dir / "long.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "long.yaml")
    assert proc.returncode != 0
    assert "pretrain.in1k.dino.warmup_steps: 500 is not shorter than run dino" in proc.stdout + proc.stderr


def test_run_sources_and_tolerances_are_checked_when_the_plan_is_made():
    """A run_sources key that is no release, a checkpoint of another run, a download below the
    paper scale or a misspelt tolerance metric stop the dry run, each by its key."""
    paper = load_config(REPO / "config/paper.yaml")

    def plan_with(section: str, key: str, value) -> Plan:
        cfg = copy.deepcopy(paper)
        cfg.setdefault(section, {})[key] = value
        return Plan(cfg)

    ok = {"dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavy2b-224"}}
    assert "dino2b-heavy2b-224" in plan_with("pretrain", "run_sources", ok).run_sources
    with pytest.raises(ConfigError, match=r"run_sources.dino2b-heavyy2b-224: no released checkpoint is this run"):
        plan_with("pretrain", "run_sources", {"dino2b-heavyy2b-224": {"checkpoint": "facebook/webssl-dino2b-heavyy2b-224"}})
    with pytest.raises(ConfigError, match=r"run_sources.dino5b-heavy2b-224: no released .*'dino300m-full2b-224'"):
        plan_with("pretrain", "run_sources", {"dino5b-heavy2b-224": {"checkpoint": "facebook/webssl-dino5b-heavy2b-224"}})
    with pytest.raises(ConfigError, match=r"run_sources.dino2b-heavy2b-224.checkpoint: 'facebook/webssl-dino7b"):
        plan_with("pretrain", "run_sources", {"dino2b-heavy2b-224": {"checkpoint": "facebook/webssl-dino7b-full8b-518"}})
    mini = load_config(REPO / "config/mini.yaml")
    mini["pretrain"]["run_sources"] = ok
    with pytest.raises(ConfigError, match=r"downloaded, which only the paper scale does \(this is 'mini'\)"):
        Plan(mini)
    mini["pretrain"]["run_sources"] = {"dino2b-heavy2b-224": {**ok["dino2b-heavy2b-224"], "path": "/ckpt/x"}}
    assert Plan(mini).import_command("dino2b-heavy2b-224").endswith("--path /ckpt/x")
    mini["seeds"] = [0, 1]
    with pytest.raises(ConfigError, match=r"seeds \[0, 1\]: each seed would import the same released encoder"):
        Plan(mini)
    with pytest.raises(ConfigError, match=r"check.tolerances: unknown metric\(s\) \['avg'\]"):
        plan_with("check", "tolerances", {"avg": 1.0, "Average": 1.0})
    assert plan_with("check", "tolerances", {"Average": 1.0, "alignment/llama3-8b": 0.01}).published is False


def test_profile_resources_that_read_unset_variables_stop_the_dry_run():
    from webssl_repro.plan_checks import check_profile_environment

    args = ["tmpdir=system_tmpdir", "slurm_account=$SLURM_ACCOUNT", "slurm_partition='${SLURM_PARTITION}'", "runtime=60"]
    check_profile_environment(args, {"SLURM_ACCOUNT": "acme", "SLURM_PARTITION": "gpu"})
    check_profile_environment(None, {})
    with pytest.raises(ConfigError, match=r"slurm_partition reads \$SLURM_PARTITION. Export"):
        check_profile_environment(args, {"SLURM_ACCOUNT": "acme"})
    # A site without accounts: exported empty, the plugin guesses one or submits without.
    check_profile_environment(args, {"SLURM_ACCOUNT": "", "SLURM_PARTITION": "gpu"})


def test_conda_deployment_stops_the_dry_run(workflow_dir):
    """The rules name environment.yml for --lint, but it installs this checkout, which
    Snakemake's copy under .snakemake/conda/ does not find: --sdm conda would fail every job."""
    from webssl_repro.plan_checks import check_deployment

    check_deployment(frozenset())
    check_deployment(None)
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "config/published.yaml", "--sdm", "conda")
    assert proc.returncode != 0
    assert "--sdm conda) cannot build this workflow's environment" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_plan_prints_the_grid_of_several_config_files(tmp_path, capsys):
    """`webssl-repro plan --configfile config/paper.yaml mine.yaml`: the files merged as
    snakemake merges them, every requested item listed (Figure 8 too), imported runs marked."""
    mine = tmp_path / "mine.yaml"
    run = "dino300m-light2b-224"
    mine.write_text(yaml.safe_dump({"pretrain": {"run_sources": {run: {"checkpoint": f"facebook/webssl-{run}"}}}}))
    assert cli.main(["plan", "--configfile", str(REPO / "config/paper.yaml"), str(mine)]) == 0
    out = capsys.readouterr().out
    paper = load_config(REPO / "config/paper.yaml")
    assert f"items ({len(paper['items'])}): " in out and out.split("\n")[1].endswith(" fig9 fig8")
    listed = yaml.safe_load(out[out.index("seeds:"):out.index("\ntable2: ")])
    assert {"run": run, "imported": f"facebook/webssl-{run}"} in listed["runs"] and len(listed["runs"]) == 31
    dino7b = next(r for r in listed["runs"] if r["run"] == "dino7b-full8b-224")
    assert dino7b["gpus"] > 8 and dino7b["gpu_hours"] > 10_000
    assert out.rstrip().endswith(Plan(paper).cost_line())  # the grid's total: the release adds no run to `all`
    broken = tmp_path / "broken.yaml"
    broken.write_text("scale: paper\nitems: [table2\n")
    assert cli.main(["plan", "--configfile", str(broken)]) == 2
    assert f'cannot read config {broken}: while parsing a flow sequence\n  in "{broken}", line 2' in capsys.readouterr().err


def test_a_batch_that_does_not_split_over_the_gpus_or_a_size_off_the_patch_grid_stops_the_dry_run(paper):
    """What the job would refuse only once granted its nodes; and a label the grid uses but the
    config lacks is named, with the ones it has."""
    cfg = copy.deepcopy(paper)
    cfg["resources"]["nodes"]["1b"] = 7  # 56 GPUs
    with pytest.raises(ConfigError, match=r"pretrain.dino.batch_size: 3,072 images per step do not split over the 56 "
                                          r"GPUs of run dino1b-full2b-224"):
        Plan(cfg).run_config("dino1b-full2b-224")
    mini = load_config(REPO / "config/mini.yaml")
    assert Plan(mini).run_config("dino1b-full2b-224")["img_size"] == 32
    off_grid = copy.deepcopy(mini)
    off_grid["labels"]["resolutions"]["224"] = 30
    with pytest.raises(ConfigError, match=r"labels.resolutions: 30 px \(run dino1b-full2b-224\) is not a whole number "
                                          r"of its 8 px patches"):
        Plan(off_grid).run_config("dino1b-full2b-224")
    del mini["labels"]["resolutions"]["518"]
    with pytest.raises(ConfigError, match=r"labels.resolutions has no entry '518' \(run dino7b-full8b-518\); it has "
                                          r"\['224', '378'\]"):
        Plan(mini).pretrain_resources("dino7b-full8b-518")


@pytest.mark.parametrize("where,value,message", [
    (("evaluate", "vqa", "chat_format"), "llama2", r"evaluate.vqa.chat_format: 'llama2' is not one of \['cambrian_llama_3', "
                                                   r"'llama_3', 'mini'\]"),
    (("evaluate", "vqa", "stage2"), {"batch_size": 12, "per_device_batch": 8},
     r"evaluate.vqa.stage2: batch_size 12 does not divide into device batches of per_device_batch 8"),
    (("evaluate", "vqa", "projector"), "mlp2x_relu", r"evaluate.vqa.projector: 'mlp2x_relu' is not 'linear' or "
                                                     r"'mlp<N>x_gelu'"),
    (("evaluate", "vqa", "tokens"), 35, r"evaluate.vqa.tokens: 35 is not a square number"),
    (("evaluate", "vqa", "language_model"), "HuggingFaceTB/SmolLM2-135M",
     r"evaluate.vqa.language_model is 'HuggingFaceTB/SmolLM2-135M', a real LM, .* this config has none"),
    (("evaluate", "classic", "depth", "batch_size"), 5, r"evaluate.classic.depth.batch_size 5 is not a multiple of "
                                                        r"samples_per_gpu 2"),
    (("evaluate", "classic", "depht"), {}, r"evaluate.classic: unknown key\(s\) \['depht'\]"),
    (("labels", "sizes", "1b", "depth"), 3, r"labels.sizes: 1b.depth 3: NYUd's lin.4 head reads 4 blocks"),
    (("data", "filter", "device"), "cuda", r"data.filter: device is not an option of backend 'ocr' \(it takes "
                                           r"cache_path, .*\); an overlay that switches backends sets them to null"),
    (("data", "filter"), {"backend": "mllm", "model": str(REPO / "config"), "revision": "v1"},
     r"data.filter.revision: 'v1' pins a hub id's commit, but data.filter.model is a local directory"),
    (("pretrain", "clip", "tokenizer_revision"), "32bd642",
     r"pretrain.clip.tokenizer_revision '32bd642' pins a hub repo's commit, but pretrain.clip.tokenizer is null"),
    (("pretrain", "clip"), {"tokenizer": str(REPO / "config/mini.yaml"), "tokenizer_revision": "32bd642"},
     r"pretrain.clip.tokenizer_revision '32bd642' is a commit of a hub repo, but pretrain.clip.tokenizer .*mini.yaml' "
     r"is a local file"),
    (("pretrain", "clip"), {"tokenizer": str(REPO / "config"), "tokenizer_revision": "32bd642"},
     r"pretrain.clip.tokenizer .*config' is a local directory: drop the revision"),
    (("pretrain", "clip"), {"tokenizer": "", "tokenizer_revision": "32bd642"},
     r"pretrain.clip.tokenizer is '' \(a tokenizer learned from the captions\)"),
    (("evaluate", "vqa", "language_model_revision"), "32bd642",
     r"evaluate.vqa.language_model_revision: '32bd642' pins a hub id's commit, but evaluate.vqa.language_model is "
     r"'tiny'"),
    (("evaluate", "alignment", "lm_revisions"), {"minilm": "32bd642"},
     r"evaluate.alignment.lm_revisions: '32bd642' pins a hub id's commit, but 'minilm' is the bundled copy"),
    (("evaluate", "alignment", "lm_revisions"), {"MiniLM": "32bd642"},
     r"evaluate.alignment.lm_revisions: 'MiniLM' is not one of evaluate.alignment.language_models \(minilm\)"),
    (("data", "evalsets", "captions", "test"), 10, r"evaluate.alignment.k: 10 nearest neighbours among the 10 "
                                                   r"captions of data.evalsets.captions; it must be in \[1, 9\]"),
])
def test_what_a_job_would_refuse_after_hours_stops_the_dry_run(where, value, message):
    """Each of these passed the dry run and stopped its jobs late: the VQA job after its feature
    pass (a misspelt chat format showed as the bare word 'llama2'), a real LM at mini fetching the
    paper's data from the hub, the classic job after its IN-1k and ADE20K parts, every filter job,
    every CLIP run (a pinned tokenizer beside a file, or none), each alignment job after its features."""
    cfg = load_config(REPO / "config/mini.yaml")
    section = cfg
    for key in where[:-1]:
        section = section.setdefault(key, {})
    section[where[-1]] = value
    with pytest.raises(ConfigError, match=message):
        Plan(cfg)


@pytest.mark.parametrize("layer,value,message", [
    ("in1k", None, r"pretrain.clip.tokenizer_revision '32bd642' pins a hub repo's commit, but "
                   r"pretrain.in1k.clip.tokenizer is null"),
    ("hires", str(REPO / "config/mini.yaml"), r"pretrain.clip.tokenizer_revision '32bd642' is a commit of a hub repo, "
                                              r"but pretrain.hires.clip.tokenizer .*mini.yaml' is a local file"),
])
def test_a_tokenizer_overlay_is_checked_as_its_clip_runs_read_it(layer, value, message):
    """The ImageNet-1k and hi-res overlays lay their keys on pretrain.clip, one or both (a hi-res
    run of in1k data): one that swaps the pinned hub tokenizer for none or a file would fail
    such CLIP runs only, after their queue wait."""
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["pretrain"]["clip"].update(tokenizer="openai/clip-vit-large-patch14", tokenizer_revision="32bd642")
    Plan(cfg)  # the pinned hub tokenizer itself passes
    cfg["pretrain"].setdefault(layer, {}).setdefault("clip", {})["tokenizer"] = value
    with pytest.raises(ConfigError, match=message):
        Plan(cfg)
    cfg["pretrain"][layer]["clip"]["tokenizer_revision"] = None  # the overlay drops the pin with it
    Plan(cfg)
    other = "hires" if layer == "in1k" else "in1k"  # a hi-res run of in1k data lays in1k, then hires, on the base
    cfg["pretrain"]["clip"]["tokenizer_revision"] = None  # each overlay alone passes: only both fail
    cfg["pretrain"][layer]["clip"] = {"tokenizer": str(REPO / "config/mini.yaml")}
    cfg["pretrain"].setdefault(other, {})["clip"] = {"tokenizer_revision": "abc"}
    with pytest.raises(ConfigError, match=r"pretrain.(in1k|hires).clip.tokenizer_revision 'abc' is a commit of a "
                                          r"hub repo, but pretrain.(in1k|hires).clip.tokenizer .*mini.yaml' is a "
                                          r"local file"):
        Plan(cfg)


@pytest.mark.parametrize("kind", ["vqa", "classic"])
def test_the_progress_settings_of_long_evaluations_pass_the_plan(kind):
    """``checkpoint_every_min`` / ``stop_margin_s`` (schema, README) are the jobs' progress
    settings, which the job reads apart from its section: the plan's check of the section
    refused them as unknown keys. A negative one is named."""
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["evaluate"][kind].update(checkpoint_every_min=10, stop_margin_s=120)
    plan = Plan(cfg)
    assert json.loads(plan.settings_json(kind))["checkpoint_every_min"] == 10
    assert "checkpoint_every_min" not in json.loads(plan.eval_config_json(kind))
    cfg["evaluate"][kind]["stop_margin_s"] = -1
    with pytest.raises(ConfigError, match=rf"evaluate.{kind}.stop_margin_s: -1.0 must be >= 0"):
        Plan(cfg)


def test_an_overlay_switching_the_filter_backend_unsets_the_others_options_with_null(paper):
    from webssl_repro.data.filters import backend_options

    cfg = copy.deepcopy(paper)
    cfg["data"]["filter"]["backend"] = "ocr"
    with pytest.raises(ConfigError, match=r"data.filter: device, dtype, model, revision are not options of backend "
                                          r"'ocr'"):
        Plan(cfg)
    cfg["data"]["filter"].update(device=None, dtype=None, model=None, revision=None)
    validate_config(cfg)
    Plan(cfg)
    assert backend_options("ocr", cfg["data"]["filter"]) == {}


@pytest.mark.parametrize("backend", ["ocr", "mllm"])
def test_the_filter_jobs_own_keys_are_no_backend_option(paper, backend):
    """``checkpoint_shards`` (schema, README) sizes the filter job's saved chunks: the plan's check
    of the backend's options refused it, and with it every config that set it."""
    from webssl_repro.data.filters import backend_options

    cfg = copy.deepcopy(paper)
    cfg["data"]["filter"].update(checkpoint_shards=5, workers=2)
    if backend == "ocr":
        cfg["data"]["filter"].update(backend="ocr", device=None, dtype=None, model=None, revision=None)
    Plan(cfg)
    options = backend_options(backend, cfg["data"]["filter"])
    assert not {"checkpoint_shards", "workers", "parts", "backend"} & set(options)


def test_a_reversed_crop_scale_stops_the_dry_run():
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["pretrain"]["dino"]["local_crops_scale"] = [0.32, 0.05]
    with pytest.raises(ConfigError, match=r"pretrain.dino.local_crops_scale: \[0.32, 0.05\] \(run dino1b-full2b-224\) "
                                          r"is not an area range"):
        Plan(cfg).run_config("dino1b-full2b-224")


def test_a_number_yaml_reads_as_text_says_so(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; the schema's 'is not of type number' alone
    leaves the user looking at a number."""
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["pretrain"]["dino"]["base_lr"] = yaml.safe_load("x: 1e-3")["x"]
    with pytest.raises(ConfigError, match=r"'pretrain.dino.base_lr': '1e-3' is not of type 'number'. YAML reads "
                                          r"'1e-3' as text: write it as 0.001"):
        validate_config(cfg, "my.yaml")
    cfg["pretrain"]["dino"]["base_lr"] = "fast"
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "my.yaml")
    assert "YAML reads" not in str(err.value)


def test_a_local_copy_to_import_must_be_there_until_the_run_is_imported(paper, tmp_path, monkeypatch):
    """Refused by its key before a job is queued; once the run is imported, deleting the copy
    stops nothing. No input is tracked: one added to the rule would rerun every imported run."""
    monkeypatch.chdir(tmp_path)
    run, local = "dino2b-heavy2b-224", tmp_path / "ckpt.pth"
    cfg = copy.deepcopy(paper)
    cfg["pretrain"]["run_sources"] = {run: {"checkpoint": f"facebook/webssl-{run}", "path": str(local)}}
    plan = Plan(cfg)
    with pytest.raises(FileNotFoundError, match=rf"pretrain.run_sources.{run}.path: {local} does not exist"):
        plan.import_inputs(run)
    local.write_bytes(b"")
    assert plan.import_inputs(run) == []
    local.unlink()
    encoder = tmp_path / plan.run_dir(run) / "encoder.safetensors"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"")
    assert plan.import_inputs(run) == []
