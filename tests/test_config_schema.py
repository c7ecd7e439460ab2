"""The config schema (config/schema.yaml): every consumer's keys typed and closed, so that a
misspelt key, a wrong type or an unknown choice is refused by name, by `snakemake` too, before
any job runs."""
import re

import pytest
import yaml

from conftest import REPO, snakemake
from webssl_repro.config import ConfigError, load_config, validate_config
from webssl_repro.metrics import VQA_BENCHMARKS


@pytest.mark.parametrize("key,value,needle", [
    ("scale_typo", "mini", "scale_typo"),
    ("seeds", "zero", "seeds"),
    ("labels.samples.2b", "many", "labels.samples.2b"),
    ("resources.mfu", 3.0, "resources.mfu"),
    ("pretrain.train.checkpoint_evry", 3, "'checkpoint_evry' was unexpected"),
    ("pretrain.dino.batch_sise", 3, "'batch_sise' was unexpected"),
    ("pretrain.clip.context_lenght", 3, "'context_lenght' was unexpected"),
    ("pretrain.in1k", {"dino": {"warmup_step": 3}}, "'warmup_step' was unexpected"),
    ("pretrain.in1k", {"vit": {}}, "'vit' was unexpected"),
    ("data.corpus.n_imgs", 3, "'n_imgs' was unexpected"),
    ("data.filter.backend", "mlm", "'mlm' is not one of"),
    ("data.filter.min_score", "high", "at key 'data.filter.min_score': 'high' is not of type 'number'"),
    ("data.filter.ocr_size", 0, "at key 'data.filter.ocr_size': 0 is less than the minimum of 8"),
])
def test_bad_config_names_the_key(tmp_path, key, value, needle):
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    node = config
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_a_computing_config_cannot_write_into_the_published_folders():
    """`--config scale=published` on the mini config would train into results/published and
    render mini numbers over the checked-in paper/published: refused, saying why."""
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    with pytest.raises(ConfigError, match=r"at key 'source': 'published' was expected \(scale published holds"):
        validate_config({**config, "scale": "published"})
    validate_config(yaml.safe_load((REPO / "config/published.yaml").read_text()))


def test_published_numbers_render_only_at_the_published_scale():
    """`--config source=published` on mini would look for mini runs' results the items do not ask
    for (and stop on an unrelated message): refused at the scale key."""
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    with pytest.raises(ConfigError, match=r"at key 'scale': 'published' was expected \(source published renders"):
        validate_config({**config, "source": "published"})


def test_gpu_nodes_need_the_partitions_time_limit():
    """Without resources.max_runtime_min a ViT-7B job would ask SLURM for its whole estimate
    (48 days at paper scale) and never start; CPU-only configs (mini) need none."""
    config = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    del config["resources"]["max_runtime_min"]
    with pytest.raises(ConfigError, match=r"at key 'resources': 'max_runtime_min' is a required property"):
        validate_config(config)
    mini = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    assert "max_runtime_min" not in mini["resources"]
    validate_config(mini)


def test_a_bad_value_is_explained_by_its_keys_description():
    config = yaml.safe_load((REPO / "config/mini.yaml").read_text())
    config["evaluate"]["vqa"]["max_new_tokens"] = 0
    with pytest.raises(ConfigError, match=re.escape("max_new_tokens': 0 is less than the minimum of 1 "
                                                    "(the longest answer generated, in tokens)")):
        validate_config(config)


def _json_type(annotation) -> dict:
    """The schema a dataclass field's annotation asks for: int, float, bool, str, a pair of
    floats, a str-keyed mapping of one of them, or one of them or null."""
    import typing

    base = {int: "integer", float: "number", bool: "boolean", str: "string"}
    if annotation in base:
        return {"type": base[annotation]}
    if typing.get_origin(annotation) is dict:
        (_, value) = typing.get_args(annotation)
        return {"type": "object", "additionalProperties": {"type": base[value]}}
    if typing.get_origin(annotation) is tuple:
        (item, _) = typing.get_args(annotation)
        return {"type": "array", "items": {"type": base[item]}, "minItems": 2, "maxItems": 2}
    (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return {"type": [base[inner], "null"]}


def _typed_like(cls, properties: dict, skip=()) -> None:
    """``properties`` (a schema section) has exactly ``cls``'s fields, each with its type."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    assert set(properties) >= set(names), sorted(set(names) - set(properties))
    for name in names:
        if "enum" in properties[name]:  # a closed set of strings
            assert hints[name] is str and all(isinstance(v, str) for v in properties[name]["enum"]), name
            continue
        if "oneOf" in properties[name]:  # a wider form the workflow reads down to the field's (run-name patterns)
            assert _json_type(hints[name]) in properties[name]["oneOf"], name
            continue
        declared = {k: v for k, v in properties[name].items() if k in ("type", "items", "minItems", "maxItems")}
        if "additionalProperties" in properties[name]:
            declared["additionalProperties"] = {"type": properties[name]["additionalProperties"]["type"]}
        assert declared == _json_type(hints[name]), (cls.__name__, name, declared)


def test_schema_types_the_config_dataclasses():
    """The schema lists each recipe's keys with their types, so the dry run rejects a misspelt
    key or a wrong value; they must stay the fields of the dataclasses that read them (plus
    CLIP's tower/tokenizer keys, and hires' steps)."""
    import dataclasses

    from webssl_repro.evaluate.vqa.probe import StageConfig, VqaConfig
    from webssl_repro.methods.clip import RECIPE_EXTRAS, ClipConfig
    from webssl_repro.methods.dino import DinoConfig
    from webssl_repro.methods.mae import MaeConfig
    from webssl_repro.train import TrainConfig

    root = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]
    schema = root["pretrain"]["properties"]
    assert all(schema[name]["additionalProperties"] is False for name in ("train", "dino", "mae", "clip", "hires"))
    allowed = {name: set(schema[name]["properties"]) for name in ("train", "dino", "mae", "clip")}
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (TrainConfig, DinoConfig, MaeConfig, ClipConfig)}
    assert allowed["train"] == fields[TrainConfig] - {"samples_seen", "global_batch_size"}  # set from the run
    assert allowed["dino"] == fields[DinoConfig]
    assert allowed["mae"] == fields[MaeConfig]
    assert allowed["clip"] == fields[ClipConfig] | set(RECIPE_EXTRAS)
    _typed_like(TrainConfig, schema["train"]["properties"], skip=("samples_seen", "global_batch_size"))
    for name, cls in (("dino", DinoConfig), ("mae", MaeConfig), ("clip", ClipConfig)):
        _typed_like(cls, schema[name]["properties"])
    # the ImageNet-1k runs' and the high-resolution fine-tunes' overrides: each method's own keys, nothing else
    assert set(schema["hires"]["properties"]) == {"steps", "dino", "mae", "clip"}
    for over in (schema["in1k"]["properties"], schema["hires"]["properties"]):
        for name in ("dino", "mae", "clip"):
            section = over[name]
            assert section["additionalProperties"] is False and section["properties"] == schema[name]["properties"]
    assert schema["in1k"]["additionalProperties"] is False and set(schema["in1k"]["properties"]) == {"dino", "mae", "clip"}
    from webssl_repro.methods.dino import CENTERINGS
    from webssl_repro.methods.schedules import LR_SCALINGS
    from webssl_repro.train.config import PRECISIONS, STRATEGIES

    closed = {("train", "precision"): PRECISIONS, ("train", "strategy"): STRATEGIES,
              ("dino", "centering"): CENTERINGS, ("dino", "lr_scaling"): LR_SCALINGS}
    for (section, key), values in closed.items():  # a choice the code refuses is refused by the dry run
        assert schema[section]["properties"][key]["enum"] == list(values), (section, key)
    vqa = root["evaluate"]["properties"]["vqa"]["properties"]
    _typed_like(VqaConfig, vqa, skip=("stage1", "stage2"))
    assert vqa["max_new_tokens_by_benchmark"]["propertyNames"]["enum"] == list(VQA_BENCHMARKS)
    from webssl_repro.evaluate.vqa.probe import PRECISIONS as VQA_PRECISIONS

    assert vqa["precision"]["enum"] == list(VQA_PRECISIONS)
    for stage in ("stage1", "stage2"):
        assert set(vqa[stage]["properties"]) == {f.name for f in dataclasses.fields(StageConfig)}
        _typed_like(StageConfig, vqa[stage]["properties"])


def test_schema_closes_the_data_and_evaluate_sections_on_their_consumers_keys():
    """A misspelt key under data.filter or evaluate.* stops the dry run (it once reached the
    job, or silently changed the plan: `parts` misspelt gave one filter job over MC-2B)."""
    import dataclasses
    import inspect

    from webssl_repro.data.filter_mllm import MLLMFilter
    from webssl_repro.data.filters import OCRFilter
    from webssl_repro.evaluate import alignment_eval, classic
    from webssl_repro.evaluate.vqa.probe import VqaConfig
    from webssl_repro.evaluate.progress import DEFAULTS as PROGRESS
    from webssl_repro.evaluate.vqa.stage import STAGE_KEYS

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]

    def names(section):
        if "propertyNames" in section:
            return set(section["propertyNames"]["enum"])
        assert section["additionalProperties"] is False
        return set(section["properties"])
    ctor = {p for cls in (OCRFilter, MLLMFilter) for p in inspect.signature(cls.__init__).parameters} - {"self", "generate_fn"}
    assert names(schema["data"]["properties"]["filter"]) == ctor | {"backend", "parts", "workers", "checkpoint_shards",
                                                                          "max_broken_shards"}
    evaluate = schema["evaluate"]["properties"]
    assert names(evaluate["vqa"]) == {f.name for f in dataclasses.fields(VqaConfig)} | set(STAGE_KEYS) | set(PROGRESS)
    assert names(evaluate["classic"]) == set(classic.DEFAULTS) | set(PROGRESS)
    for task in ("linear", "segmentation", "depth"):
        assert names(evaluate["classic"]["properties"][task]) == set(classic.DEFAULTS[task]), task
    assert names(evaluate["alignment"]) == set(alignment_eval.DEFAULTS)


@pytest.mark.parametrize("section, key", [("data.filter", "partz"), ("evaluate.vqa", "stratgy"),
                                          ("evaluate.alignment", "language_model"), ("evaluate.classic.depth", "iter"),
                                          ("evaluate.vqa.stage2", "epoch"), ("data.evalsets", "clasification"),
                                          ("data.evalsets.depth", "trian")])
def test_a_misspelt_section_key_is_refused_by_name(section, key):
    """At any depth: a nested key of a consumer's section is as closed as its top level."""
    cfg = load_config(REPO / "config/mini.yaml")
    *parts, last = section.split(".")
    node = cfg
    for part in parts:
        node = node.setdefault(part, {})
    node = node.setdefault(last, {"train": 8, "val": 4} if section == "data.evalsets.depth" else {})
    node[key] = 1
    with pytest.raises(ConfigError, match=rf"at key '{re.escape(section)}': ('{key}' is not one of|.*'{key}' was "
                                          rf"unexpected|'{key}' does not match)"):
        validate_config(cfg)


def test_a_value_of_no_allowed_form_is_explained_by_its_nearest_form():
    """A setting of several forms (``anyOf``) once answered a misspelt key with "is not valid under
    any of the given schemas" and the whole mapping: now the nearest form's errors name the key."""
    cfg = load_config(REPO / "config/paper.yaml")
    cfg["data"]["evalsets"]["segmentation"]["datset"] = "/x"
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "my.yaml")
    assert str(err.value) == (
        "my.yaml: at key 'data.evalsets.segmentation': Additional properties are not allowed ('datset' was "
        "unexpected); known keys are ['config', 'dataset', 'limit', 'revision', 'splits'] (as source hf: the "
        "dataset behind the task, over HF_EVALSETS)")
    cfg = load_config(REPO / "config/paper.yaml")
    cfg["data"]["in1k"] = {"shard": "/x"}  # as near to real shards as to the generator's settings
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, "my.yaml")
    assert [line.split(": ", 2)[2] for line in str(err.value).splitlines()] == [
        "'shards' is a required property",  # the paper scale needs real ImageNet-1k shards
        "Additional properties are not allowed ('shard' was unexpected); known keys are ['shards'] "
        "(as real ImageNet-1k webdataset shards)",
        "'shards' is a required property (as real ImageNet-1k webdataset shards)",
        "Additional properties are not allowed ('shard' was unexpected); known keys are ['image_format', 'kinds', "
        "'n_images', 'seed', 'shard_size', 'size'] (as mini-web generator (webssl_repro.data.stages.build_corpus))"]


@pytest.mark.parametrize("section, key, value", [("pretrain.dino", "batch_size", "thirty-two"),
                                                 ("pretrain.train", "betas", [0.9]),
                                                 ("evaluate.vqa.stage1", "lr", "fast"),
                                                 ("evaluate.classic.segmentation", "img_size", [64, 64, 64]),
                                                 ("evaluate.classic", "precision", "fp8"),
                                                 ("pretrain.train", "precision", "bf61"),
                                                 ("pretrain.dino", "centering", "center"),
                                                 ("evaluate.alignment", "k", 2.5),
                                                 ("evaluate.classic.linear", "batch_size", 0),
                                                 ("pretrain.clip", "layerscale", 0),  # no loader fits it
                                                 ("pretrain.dino", "layerscale", 0),
                                                 ("data.corpus", "size", 12),  # MiniWebConfig's 16 px floor
                                                 ("data.corpus", "seed", 2_000_000)])  # an eval set's seed
def test_a_wrong_type_or_choice_is_refused_naming_its_key_and_value(section, key, value):
    cfg = load_config(REPO / "config/mini.yaml")
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ConfigError, match=rf"at key '{re.escape(section)}.{key}': {re.escape(repr(value))} is "):
        validate_config(cfg)


@pytest.mark.parametrize("section, key, value", [("resources", "gpus_per_node", "eight"),
                                                 ("pretrain.dino", "batch_size", "thirty-two"),
                                                 ("labels.sizes.1b", "heads", 7)])  # the plan's check
def test_snakemake_rejects_a_bad_config_before_any_job(workflow_dir, section, key, value):
    """With the message alone: Python frames would point at the code, where nothing is to fix."""
    bad = yaml.safe_load((workflow_dir / "config/mini.yaml").read_text())
    node = bad
    for part in section.split("."):
        node = node[part]
    node[key] = value
    (workflow_dir / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(workflow_dir, "-n", "all", "--configfile", "bad.yaml")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert key in out and str(value) in out
    assert "File " not in out and "ConfigError" not in out
    assert not (workflow_dir / "paper").exists()


def test_an_override_file_alone_is_told_to_follow_its_scales_config(tmp_path):
    override = tmp_path / "mine.yaml"
    override.write_text("seeds: [0, 1]\n")
    with pytest.raises(ConfigError, match=r"'scale' is a required property(.|\n)*give the scale's config first, "
                                          r"e.g. --configfile config/mini.yaml mine.yaml"):
        load_config(override)


def test_a_model_path_that_does_not_exist_is_named_by_its_key(tmp_path):
    """transformers takes a missing local path for a hub id and fails on that ("Repo id must be
    in the form..."); the LM and filter-model keys name the path instead."""
    from webssl_repro.evaluate.vqa.lm import load_lm, load_tokenizer
    from webssl_repro.files import model_location

    assert model_location("meta-llama/Meta-Llama-3-8B-Instruct", "k") == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert model_location(tmp_path, "k") == str(tmp_path)
    with pytest.raises(ValueError, match=r"evaluate.vqa.language_model: /datasets/nolm does not exist"):
        load_lm("/datasets/nolm")
    with pytest.raises(ValueError, match=r"evaluate.vqa.language_model: ./nolm does not exist"):
        load_tokenizer("./nolm")
    with pytest.raises(ValueError, match=r"k: models/meta/llama does not exist"):
        model_location("models/meta/llama", "k")


def test_corpus_kinds_are_the_generators_kinds():
    """A misspelt kind (`charts`) once passed the dry run and failed only in the shards job."""
    from webssl_repro.data.miniweb import KINDS

    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    kinds = schema["$defs"]["generated_corpus"]["properties"]["kinds"]
    assert kinds["propertyNames"]["enum"] == list(KINDS)
    cfg = load_config(REPO / "config/mini.yaml")
    cfg["data"]["corpus"]["kinds"] = {"objects": 1.0, "charts": 0.5}
    with pytest.raises(ConfigError, match=r"at key 'data.corpus.kinds': 'charts' is not one of"):
        validate_config(cfg)
    for no_weight in ({}, {"objects": 0.0, "chart": 0}):  # no image could be drawn
        cfg["data"]["corpus"]["kinds"] = no_weight
        with pytest.raises(ConfigError, match=r"at key 'data.corpus.kinds'"):
            validate_config(cfg)
    cfg["data"]["corpus"]["kinds"] = {"objects": 0.0, "chart": 0.5}
    validate_config(cfg)
