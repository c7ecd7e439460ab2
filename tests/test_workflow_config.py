"""What a user sees when a config or a command line is off: the messages name the key and the
alternatives, and the dry run's cost summary counts what will really be trained."""
import copy
import re

import pytest

from conftest import REPO
from webssl_repro import cli
from webssl_repro.config import ConfigError, config_origin, load_config
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


def test_eval_gpus_beyond_one_node_is_refused(paper):
    cfg = copy.deepcopy(paper)
    cfg["resources"]["eval_gpus"] = 16
    with pytest.raises(ConfigError, match=r"resources.eval_gpus: 16 GPUs, .* resources.gpus_per_node is 8"):
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


@pytest.mark.parametrize("key,value,message", [
    (("pretrain", "dino", "batch_size"), 0, "0 is less than the minimum of 1"),
    (("pretrain", "mae", "batch_size"), -5, "-5 is less than the minimum of 1"),
    (("pretrain", "dino", "teacher_temp"), 0.0, "0.0 is less than or equal to the minimum of 0"),
    (("pretrain", "dino", "momentum_teacher"), 1.5, "1.5 is greater than the maximum of 1"),
    (("evaluate", "vqa", "stage2", "micro_batch_size"), 0, "0 is less than the minimum of 1"),
    (("seeds",), [0, 0], "[0, 0] has non-unique elements"),
])
def test_out_of_range_recipe_values_are_named_by_key(paper, key, value, message):
    """A batch size of 0 was a ZeroDivisionError in the run-length arithmetic, a negative one
    blamed the warm-up; duplicate seeds doubled the cost line over one directory."""
    from webssl_repro.config import validate_config

    cfg = copy.deepcopy(paper)
    section = cfg
    for k in key[:-1]:
        section = section.setdefault(k, {})
    section[key[-1]] = value
    with pytest.raises(ConfigError, match=rf"my.yaml: at key '{re.escape('.'.join(key))}': {re.escape(message)}"):
        validate_config(cfg, "my.yaml")


def test_cli_errors_name_the_problem_unquoted(capsys, tmp_path):
    rc = cli.main(["render", "fig10", "--scale", "published", "--source", "published", "--outputs", str(tmp_path)])
    assert rc == 2
    assert "webssl-repro render: error: unknown paper item 'fig10'; known: table2," in capsys.readouterr().err
