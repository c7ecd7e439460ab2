"""The paper-scale ``vqa`` stage on tiny local stand-ins (nothing is downloaded).

Stand-ins: a few rows per real benchmark with the hub datasets' field names, saved with
``save_to_disk``; two Cambrian jsonl files (with LAION rows to drop) and their images; a
randomly initialised tiny Llama with a locally built tokenizer that knows Llama-3's chat
special tokens; a tiny ViT saved as ``encoder.safetensors``. The config names them exactly
where config/paper.yaml names the hub datasets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers_stand_ins import build_tiny_llama, save_tiny_encoder
from webssl_repro.metrics import VQA_BENCHMARKS, VQA_CATEGORIES

datasets = pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


def _img(k: int):
    from PIL import Image

    return Image.new("RGB", (24, 20), ((40 * k) % 256, (90 + 30 * k) % 256, (200 - 20 * k) % 256))


def benchmark_rows() -> dict[str, list[dict[str, Any]]]:
    """Two or three rows per benchmark, with the columns of the hub datasets' cards."""
    mc = {"A": "red", "B": "blue", "C": "green", "D": "black"}
    return {
        "mme": [{"question_id": "a.jpg", "question": f"Is it {c}? Please answer yes or no.", "answer": a,
                 "category": "color", "image": _img(1)} for c, a in (("red", "Yes"), ("blue", "No"))],
        "mmbench": [{"index": k, "question": "Which colour?", "hint": None, **mc, "answer": "B",
                     "category": "attribute", "image": _img(k)} for k in range(2)],
        "seed": [{"question_id": str(k), "question": "What is shown?", "answer": "A", "choice_a": "a box",
                  "choice_b": "a cat", "choice_c": "a cup", "choice_d": "a dog", "data_type": "image",
                  "image": [_img(k)]} for k in range(2)],
        "gqa": [{"id": str(k), "imageId": f"n{k}", "question": "What is on the table?", "answer": "cup"}
                for k in range(2)],
        "sqa": [{"image": _img(3), "question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1,
                 "hint": "Animals."}, {"image": _img(4), "question": "Which is hot?", "choices": ["ice", "fire"],
                                       "answer": 1, "hint": ""}],
        "mmmu": [{"id": "v1", "question": "<image 1> Which shape?", "options": "['circle', 'square']",
                  "answer": "A", "question_type": "multiple-choice", "image_1": _img(5)},
                 {"id": "v2", "question": "<image 1> How many sides?", "options": "[]", "answer": "4",
                  "question_type": "open", "image_1": _img(6)}],
        "mathvista": [{"pid": "1", "question": "What is x?", "query": "Hint: answer an integer.\nWhat is x?",
                       "choices": None, "answer": "3", "answer_type": "integer", "question_type": "free_form",
                       "decoded_image": _img(7)},
                      {"pid": "2", "question": "Which is larger?", "query": "Choose: A or B", "choices": ["A", "B"],
                       "answer": "A", "answer_type": "text", "question_type": "multi_choice",
                       "decoded_image": _img(8)}],
        "ai2d": [{"question": "Which eats grass?", "options": ["fox", "deer"], "answer": "1", "image": _img(9)}] * 2,
        "chartqa": [{"type": "human_test", "question": "Highest bar?", "answer": "2019", "image": _img(10)}] * 2,
        "ocrbench": [{"dataset": "IIIT5K", "question": "What is written?", "question_type": "Regular Text Recognition",
                      "answer": ["STOP", "stop"], "image": _img(11)}] * 2,
        "textvqa": [{"question_id": k, "question": "What brand?", "answers": ["acme"] * 10, "image": _img(12)}
                    for k in range(2)],
        "docvqa": [{"questionId": str(k), "question": "What is the date?", "answers": ["1 May"], "image": _img(13)}
                   for k in range(2)],
        "mmvp": [{"Index": k, "Question": "Is the door open or closed?", "Options": "(a) Open (b) Closed",
                  "Correct Answer": "(a)" if k == 1 else "(b)", "image": _img(14 + k)} for k in (1, 2)],
        "realworldqa": [{"question": "How many cars?\nAnswer with a number.", "answer": "2", "image": _img(16)}] * 2,
        "cvbench2d": [{"idx": k, "type": "2D", "task": "Count", "question": "How many chairs?",
                       "prompt": "How many chairs?\n(A) 1\n(B) 2", "choices": ["1", "2"], "answer": "(B)",
                       "source": src, "image": _img(17 + k)} for k, src in enumerate(("ADE20K", "COCO"))],
        "cvbench3d": [{"idx": 9, "type": "3D", "task": "Depth", "question": "Which is closer?",
                       "prompt": "Which is closer?\n(A) box\n(B) cup", "choices": ["box", "cup"], "answer": "(A)",
                       "source": "Omni3D", "image": _img(19)}] * 2,
    }


def _conv(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)]


def build_stand_ins(root: Path) -> dict[str, Any]:
    """Local copies of every dataset the paper config names; returns the ``evaluate.vqa.data`` section."""
    benches: dict[str, Any] = {}
    for name, rows in benchmark_rows().items():
        datasets.Dataset.from_list(rows).save_to_disk(str(root / "bench" / name))
        benches[name] = {"path": str(root / "bench" / name)}
    datasets.Dataset.from_list([{"id": f"n{k}", "image": _img(20 + k)} for k in range(2)]).save_to_disk(
        str(root / "bench" / "gqa_images"))
    benches["gqa"]["images"] = {"path": str(root / "bench" / "gqa_images")}

    images = root / "cambrian"
    for rel in ("coco/1.jpg", "sam/2.jpg", "laion/3.jpg", "ocr_vqa/4.jpg"):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        _img(len(rel)).save(images / rel)
    alignment = [
        {"id": "a1", "image": "coco/1.jpg", "conversations": _conv("<image>\nDescribe the image briefly.", "A cup.")},
        {"id": "a2", "image": "sam/2.jpg", "conversations": _conv("<image>\nDescribe the image briefly.", "A box.")},
        {"id": "a3", "image": "laion/3.jpg", "conversations": _conv("<image>\nDescribe.", "LAION row")},
    ]
    instruction = [
        {"id": "i1", "image": "ocr_vqa/4.jpg", "conversations": _conv(
            "<image>\nWhat is the title?\nAnswer the question using a single word or phrase.", "Dune",
            "Who wrote it?", "Herbert")},
        {"id": "i2", "conversations": _conv("Say hello.", "Hello.")},
        {"id": "i3", "image": "coco/1.jpg", "source": "laion_gpt4v", "conversations": _conv("<image>\nWhat?", "x")},
        {"id": "i4", "image": "sam/2.jpg", "conversations": _conv(
            "<image>\nWhich colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices "
            "directly.", "B")},
    ]
    for name, rows in (("alignment.jsonl", alignment), ("instruction.jsonl", instruction)):
        (root / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {
        "exclude_laion": True,
        "alignment": {"repo": "nyu-visionx/Cambrian-Alignment", "file": str(root / "alignment.jsonl"),
                      "image_root": str(images)},
        "instruction": {"repo": "nyu-visionx/Cambrian-10M", "file": "instruction.jsonl", "local_dir": str(root),
                        "image_root": str(images)},
        "benchmark_limit": 2,
        "benchmarks": benches,
    }


def paper_vqa_config(data: dict[str, Any], lm: Path) -> dict[str, Any]:
    stage = {"batch_size": 4, "micro_batch_size": 4, "epochs": 1, "warmup_ratio": 0.0}
    return {"scale": "paper", "language_model": str(lm), "tokens": 4, "max_length": 256, "max_new_tokens": 3,
            "eval_batch_size": 8, "stage1": {"lr": 1e-3, **stage}, "stage2": {"lr": 1e-3, **stage}, "data": data}


def test_paper_vqa_end_to_end_on_local_stand_ins(tmp_path):
    """`webssl-repro evaluate vqa` with a non-tiny LM: Cambrian → 16 real benchmarks → vqa.json."""
    from webssl_repro.cli import main

    data = build_stand_ins(tmp_path)
    texts = [str(v) for rows in benchmark_rows().values() for r in rows for v in r.values() if isinstance(v, str)]
    lm = build_tiny_llama(tmp_path / "lm", texts)
    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors")
    cfg = paper_vqa_config(data, lm)
    unused = tmp_path / "vqa.json"  # the rule still hands over the mini-web manifests; paper scale ignores them
    unused.write_text(json.dumps({"task": "vqa"}))
    out = tmp_path / "evals" / "dino_1b" / "vqa.json"
    rc = main(["evaluate", "vqa", "--run", "dino_1b", "--encoder", str(encoder), "--eval-json", json.dumps(cfg),
               "--data", str(unused), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert set(VQA_BENCHMARKS) | set(VQA_CATEGORIES) | {"Average"} <= set(metrics)
    assert all(isinstance(metrics[k], float) for k in metrics)
    assert 0.0 <= metrics["mme"] <= 2000.0 and 0.0 <= metrics["Average"] <= 100.0
    from webssl_repro.evaluate.vqa.categories import category_scores

    # the categories and the Average are those of the job's own benchmark scores
    assert {k: metrics[k] for k in (*VQA_CATEGORIES, "Average")} == category_scores(
        {b: metrics[b] for b in VQA_BENCHMARKS})
    assert result["config_hash"] == hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    counts = result["details"]["data"]
    assert (counts["alignment"], counts["instruction"]) == (2, 3)  # the LAION rows are gone
    assert counts["benchmarks"] == {b: 2 for b in VQA_BENCHMARKS}  # benchmark_limit, MME pair kept
    assert [t["stage"] for t in result["details"]["training"]] == [1, 2]


def _training(result: dict) -> list[dict]:
    return [{k: v for k, v in stage.items() if k != "seconds"} for stage in result["details"]["training"]]


def test_paper_vqa_as_the_workflow_runs_it_probe_job_then_answer_job(tmp_path, capsys):
    """The vqa_probe job trains and saves the probe, the vqa job answers with it: the same
    numbers as one process training and answering (weights saved and loaded exactly). The
    answer job reads no Cambrian file, takes a changed answer limit, and refuses a probe
    trained with another recipe, by name."""
    import shutil

    from webssl_repro.cli import main

    data = build_stand_ins(tmp_path)
    texts = [str(v) for rows in benchmark_rows().values() for r in rows for v in r.values() if isinstance(v, str)]
    lm = build_tiny_llama(tmp_path / "lm", texts)
    encoder = save_tiny_encoder(tmp_path / "encoder.safetensors")
    cfg = paper_vqa_config(data, lm)
    unused = tmp_path / "vqa.json"
    unused.write_text(json.dumps({"task": "vqa"}))

    def evaluate(kind: str, out: Path, config: dict, *extra: str) -> int:
        return main(["evaluate", kind, "--run", "dino_1b", "--encoder", str(encoder), "--eval-json", json.dumps(config),
                     "--data", str(unused), "--out", str(out), *extra])

    one = tmp_path / "one" / "evals" / "dino_1b" / "vqa.json"
    assert evaluate("vqa", one, cfg) == 0
    probe = tmp_path / "two" / "evals" / "dino_1b" / "vqa_probe"
    assert evaluate("vqa_probe", probe, cfg) == 0
    assert (probe / "probe.json").is_file() and (probe / "weights").is_dir() and not (probe / "tokenizer").exists()
    assert not (tmp_path / "two" / "eval_state" / "evals" / "dino_1b" / "vqa_probe").exists()  # removed once written
    for cambrian in (tmp_path / "alignment.jsonl", tmp_path / "instruction.jsonl"):
        cambrian.unlink()
    shutil.rmtree(tmp_path / "cambrian")
    two = tmp_path / "two" / "evals" / "dino_1b" / "vqa.json"
    assert evaluate("vqa", two, cfg, "--probe", str(probe)) == 0
    whole, split = json.loads(one.read_text()), json.loads(two.read_text())
    assert split["metrics"] == whole["metrics"] and split["config_hash"] == whole["config_hash"]
    assert _training(split) == _training(whole) and split["details"]["data"] == whole["details"]["data"]

    shorter = tmp_path / "two" / "evals" / "dino_1b" / "vqa_short.json"
    assert evaluate("vqa", shorter, {**cfg, "max_new_tokens": 1, "eval_batch_size": 4}, "--probe", str(probe)) == 0
    assert _training(json.loads(shorter.read_text())) == _training(whole)
    capsys.readouterr()
    other = {**cfg, "stage2": {**cfg["stage2"], "lr": 2e-3}}
    assert evaluate("vqa", tmp_path / "refused.json", other, "--probe", str(probe)) == 2
    assert not (tmp_path / "refused.json").exists()
    err = capsys.readouterr().err
    assert f"{probe / 'probe.json'}: the probe was trained with evaluate.vqa of hash" in err
    assert "a key of evaluate.vqa other than the settings and max_new_tokens, max_new_tokens_by_benchmark, " in err
    assert evaluate("vqa", tmp_path / "refused.json", cfg, "--probe", str(probe)) == 0  # the run: --run dino_1b
    rc = main(["evaluate", "vqa", "--run", "dino_2b", "--encoder", str(encoder), "--eval-json", json.dumps(cfg),
               "--data", str(unused), "--out", str(tmp_path / "other.json"), "--probe", str(probe)])
    assert rc == 2 and "the probe of run 'dino_1b', not of 'dino_2b'" in capsys.readouterr().err


def test_paper_data_reads_config_sources_and_drops_laion(tmp_path):
    from webssl_repro.evaluate.vqa.paper import load_paper_data

    data = build_stand_ins(tmp_path)
    data["benchmarks"]["mmvp"]["limit"] = 1
    loaded = load_paper_data(data)
    assert [s.meta["id"] for s in loaded.alignment] == ["a1", "a2"]
    assert [s.meta["id"] for s in loaded.instruction] == ["i1", "i2", "i4"]
    assert loaded.instruction[0].turns == (("Who wrote it?", "Herbert"),) and loaded.instruction[1].image_id is None
    assert len(loaded.tests["mmvp"]) == 2 and len(loaded.tests["gqa"]) == 2  # limit 1: the first pair, whole
    gqa = loaded.tests["gqa"][1]
    assert gqa.image_id == "bench:gqa/1"
    assert loaded.load_image(gqa.image_id).getpixel((0, 0)) == _img(21).getpixel((0, 0))
    seed = loaded.tests["seed"][0]
    assert loaded.load_image(seed.image_id).size == (24, 20)  # a list-of-images column: the first
    cam = loaded.alignment[0]
    assert cam.image_id.endswith("coco/1.jpg") and loaded.load_image(cam.image_id).size == (24, 20)
    with pytest.raises(KeyError, match="unknown key"):
        load_paper_data({**data, "benchmarks": {**data["benchmarks"], "vqav2": {"path": "x"}}})
    data_with_all = dict(data, exclude_laion=False)
    assert len(load_paper_data(data_with_all).alignment) == 3
    assert loaded.counts["laion_excluded"]["alignment"] == 1 and loaded.counts["laion_markers"] == ["laion"]
    by_folder = load_paper_data(dict(data, exclude_laion=["laion", "sam/"]))
    assert len(by_folder.alignment) == 1 and by_folder.counts["laion_excluded"]["alignment"] == 2
    with pytest.raises(ValueError, match=r"evaluate.vqa.data.exclude_laion: 'laion' is not true, false or a list"):
        load_paper_data(dict(data, exclude_laion="laion"))
    # a path of the user's that does not exist is not looked up on the hub; a bad line is named
    missing = {**data["alignment"], "file": str(tmp_path / "nowhere.jsonl"), "local_dir": None}
    with pytest.raises(FileNotFoundError, match=r"evaluate.vqa.data.alignment.file: .*nowhere.jsonl does not exist"):
        load_paper_data({**data, "alignment": missing})
    # a wrong image_root, a missing or undecodable image: refused before any training, by file
    with pytest.raises(FileNotFoundError, match=r"evaluate.vqa.data.instruction.image_root: .*nowhere is not a dir"):
        load_paper_data({**data, "instruction": {**data["instruction"], "image_root": str(tmp_path / "nowhere")}})
    images = Path(data["alignment"]["image_root"])
    (images / "sam/2.jpg").rename(images / "sam/2.moved")
    (images / "coco/1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"evaluate.vqa.data.alignment: 2 of 2 images checked \(of 2\) do not open "
                                         r"with image_root .*cambrian: .*coco/1.jpg \(UnidentifiedImageError\), "
                                         r".*sam/2.jpg \(FileNotFoundError\)$"):
        load_paper_data(data)
    (images / "sam/2.moved").rename(images / "sam/2.jpg")
    _img(len("coco/1.jpg")).save(images / "coco/1.jpg")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(Path(data["alignment"]["file"]).read_text().splitlines()[0] + "\n{\"id\": \"a2\",\n")
    with pytest.raises(ValueError, match=r"broken.jsonl line 2: not a JSON record"):
        load_paper_data({**data, "alignment": {**data["alignment"], "file": str(broken)}})


def test_paper_config_names_the_verified_hub_sources(monkeypatch):
    """config/paper.yaml's ids/configs/splits are what reaches `load_dataset`, and agree with real.BENCHMARKS."""
    from webssl_repro.config import load_config, validate_config
    from webssl_repro.evaluate.vqa import paper, real

    cfg = load_config(REPO / "config" / "paper.yaml")
    validate_config(cfg)
    section = cfg["evaluate"]["vqa"]
    assert section["language_model"] != "tiny"
    data = section["data"]
    assert set(data["benchmarks"]) == set(VQA_BENCHMARKS) and data["exclude_laion"] is True
    for name, src in data["benchmarks"].items():
        spec = real.BENCHMARKS[name]
        assert (src["path"], src.get("name"), src["split"]) == (spec.path, spec.name, spec.split), name
    assert (data["alignment"]["repo"], data["alignment"]["file"]) == real.CAMBRIAN["alignment"]
    assert (data["instruction"]["repo"], data["instruction"]["file"]) == real.CAMBRIAN["instruction"]

    calls = []
    rows = benchmark_rows()

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        key = {"testdev_balanced_images": "gqa_images", "2D": "cvbench2d", "3D": "cvbench3d"}.get(name)
        key = key or next(b for b in VQA_BENCHMARKS if real.BENCHMARKS[b].path == path)
        if key == "gqa_images":
            return datasets.Dataset.from_list([{"id": "n0", "image": "I0"}, {"id": "n1", "image": "I1"}])
        return datasets.Dataset.from_list([{k: v for k, v in r.items()} for r in rows[key]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for name in VQA_BENCHMARKS:
        samples, _ = paper.benchmark(name, data["benchmarks"][name], None)
        assert samples, name
    assert ("lmms-lab/GQA", "testdev_balanced_images", "testdev") in calls
    assert ("nyu-visionx/CV-Bench", "3D", "test") in calls and ("lmms-lab-eval/MMVP", None, "train") in calls


def test_tiny_language_model_keeps_the_mini_web_path(tmp_path):
    """`language_model: tiny` still needs the mini-web manifests and refuses paper-scale data keys."""
    from webssl_repro.evaluate.vqa.stage import run_vqa

    class Enc(torch.nn.Module):
        embed_dim = 8

    with pytest.raises(ValueError, match="'vqa' manifest"):
        run_vqa(Enc(), {"img_size": 32}, {}, {"language_model": "tiny", "tokens": 4}, tmp_path)
    with pytest.raises(ValueError, match="takes none"):
        run_vqa(Enc(), {"img_size": 32}, {}, {"language_model": "tiny", "data": {"benchmark_limit": 1}}, tmp_path)
    mini = yaml.safe_load((REPO / "config" / "mini.yaml").read_text())["evaluate"]["vqa"]
    assert mini["language_model"] == "tiny" and "data" not in mini


def test_an_unreachable_hub_model_is_named_by_its_key(monkeypatch):
    """Offline or gated, transformers raises an OSError whose traceback names no config key."""
    import transformers

    from webssl_repro.evaluate.vqa.lm import load_lm, load_tokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them\n"
                      "in the cached files.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    for load in (load_tokenizer, load_lm):
        with pytest.raises(ValueError, match=r"^evaluate.vqa.language_model: cannot load 'meta-llama/Meta-Llama-3-8B-"
                                             r"Instruct' \(OSError: We couldn't connect .* find them\); a hub id needs "
                                             r"the hub.*HF_TOKEN.*HF_HUB_OFFLINE=1"):
            load("meta-llama/Meta-Llama-3-8B-Instruct")


def test_a_pinned_lm_is_read_at_its_revision_by_every_loader(monkeypatch, tmp_path):
    """evaluate.vqa.language_model_revision reaches each from_pretrained the probe's LM goes
    through (tokenizer, weights, or config and generation config on a rank that receives its
    shards); unpinned, none is passed (the hub's newest). Beside 'tiny' or a local copy, whose
    files from_pretrained would read whatever the pin, it stops the plan."""
    import transformers

    from webssl_repro.evaluate.vqa import lm as lm_module
    from webssl_repro.evaluate.vqa.config import VqaConfig
    from webssl_repro.evaluate.vqa.probe import build_probe

    hub, commit = "meta-llama/Meta-Llama-3-8B-Instruct", "5f0b02c75b57c5855da9ae460ce51323ea669d8a"
    asked: list[tuple[str, dict]] = []

    def recorder(kind, result=None):
        def load(path, *args, **kwargs):
            asked.append((kind, {k: v for k, v in kwargs.items() if k == "revision"}))
            return result() if result else None
        return staticmethod(load)

    tiny = transformers.LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("weights"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder("config", lambda: tiny))
    monkeypatch.setattr(transformers.GenerationConfig, "from_pretrained",
                        recorder("generation", transformers.GenerationConfig))
    lm_module.load_tokenizer(hub, commit)
    lm_module.load_lm(hub, revision=commit)
    lm_module.load_lm(hub, weights=False, revision=commit)
    assert asked == [(kind, {"revision": commit}) for kind in ("tokenizer", "weights", "config", "generation")]
    asked.clear()
    lm_module.load_tokenizer(hub)
    lm_module.load_lm(hub)
    assert asked == [("tokenizer", {}), ("weights", {})]

    passed = []

    def stop(*args, **kwargs):
        passed.append(kwargs.get("revision", args[1] if len(args) > 1 else None))
        raise RuntimeError("stop")

    monkeypatch.setattr(lm_module, "load_tokenizer", stop)
    with pytest.raises(RuntimeError, match="stop"):
        build_probe(VqaConfig.from_mapping({"language_model": hub, "language_model_revision": commit}), 8)
    assert passed == [commit]

    with pytest.raises(ValueError, match=r"evaluate.vqa.language_model_revision: '5f0b02c.*' pins a hub id's commit, "
                                         r"but evaluate.vqa.language_model is 'tiny'"):
        VqaConfig.from_mapping({"language_model": "tiny", "language_model_revision": commit})
    with pytest.raises(ValueError, match=r"evaluate.vqa.language_model_revision: '5f0b02c.*' pins a hub id's commit, "
                                         rf"but evaluate.vqa.language_model is a local directory \({tmp_path}\)"):
        VqaConfig.from_mapping({"language_model": str(tmp_path), "language_model_revision": commit})
