import pytest

from webssl_repro.runs import Run, is_run_name, sort_runs


@pytest.mark.parametrize("name,fields", [
    ("dino7b-full8b-518", ("dino", "7b", "full", "8b", 518)),
    ("dino2b-heavy2b-224", ("dino", "2b", "heavy", "2b", 224)),
    ("mae3b-full2b-224", ("mae", "3b", "full", "2b", 224)),
    ("clip7b-full4b-224", ("clip", "7b", "full", "4b", 224)),
    ("dino1b-in1k-224", ("dino", "1b", "in1k", None, 224)),
    ("dino300m-light2b-224", ("dino", "300m", "light", "2b", 224)),
])
def test_parse_fields_and_round_trip(name, fields):
    run = Run.parse(name)
    assert (run.method, run.size, run.data, run.samples, run.res) == fields
    assert str(run) == name
    assert Run.parse(str(run)) == run


@pytest.mark.parametrize("bad", ["dino7b-full8b", "vit7b-full8b-224", "dino6b-full2b-224", "dino7b-full3b-224",
                                 "dino7b-in1k2b-224", "dino7b-full8b-512", "DINO7B-full8b-224", ""])
def test_parse_rejects_bad_names_naming_them(bad):
    with pytest.raises(ValueError, match="not a run name"):
        Run.parse(bad)
    assert not is_run_name(bad)


def test_hires_parent_is_the_224_run():
    assert str(Run.parse("dino7b-full8b-518").parent) == "dino7b-full8b-224"
    assert Run.parse("dino7b-full8b-224").parent is None


def test_fields_are_validated():
    with pytest.raises(ValueError, match="samples"):
        Run("dino", "1b", "in1k", "2b", 224)
    with pytest.raises(ValueError, match="res"):
        Run("dino", "1b", "full", "2b", 256)


def test_sort_is_by_method_size_data_samples_res():
    names = ["clip1b-full2b-224", "dino7b-full8b-518", "dino1b-full2b-224", "dino7b-full8b-224", "dino1b-in1k-224"]
    assert sort_runs(names) == ["dino1b-full2b-224", "dino1b-in1k-224", "dino7b-full8b-224", "dino7b-full8b-518",
                                "clip1b-full2b-224"]


def test_hires_fine_tune_keeps_every_step_count_as_a_share_of_its_steps():
    """App. C: "all other parameters remain exactly the same ..., including the learning rate
    warmup ratio". The 20k-step fine-tune of the 8B-seen run (2,604,167 steps of 3072) scales
    the lr warm-up (100k), the teacher-temperature warm-up (37.5k, a DinoConfig default, not in
    the config) and the prototype freeze (1250) alike, so the teacher reaches 0.07."""
    from pathlib import Path

    from webssl_repro.config import load_config
    from webssl_repro.methods.dino import DinoConfig
    from webssl_repro.workflow import Plan

    cfg = Plan(load_config(Path(__file__).parents[1] / "config" / "paper.yaml")).run_config("dino7b-full8b-518")
    recipe = cfg["recipe"]
    assert (recipe["warmup_steps"], recipe["warmup_teacher_temp_steps"], recipe["freeze_last_layer_steps"]) == (768, 288, 10)
    assert (recipe["batch_size"], recipe["base_lr"]) == (2048, 1e-5)
    dino = DinoConfig.from_mapping({**recipe, "total_steps": 20_000})
    assert dino.teacher_temp_at(0) == 0.04 and dino.teacher_temp_at(286) < 0.07
    assert dino.teacher_temp_at(287) == pytest.approx(0.07) and dino.teacher_temp_at(19_999) == 0.07
    # a recipe that leaves the batch at DinoConfig's 3072: the parent's steps are still of 3072,
    # not of the fine-tune's 2048 (which would shorten every warm-up by a third)
    config = load_config(Path(__file__).parents[1] / "config" / "paper.yaml")
    del config["pretrain"]["dino"]["batch_size"]
    assert DinoConfig().batch_size == 3072
    unset = Plan(config).run_config("dino7b-full8b-518")["recipe"]
    assert (unset["warmup_steps"], unset["warmup_teacher_temp_steps"], unset["freeze_last_layer_steps"]) == (768, 288, 10)
