"""Paper-scale inputs behind the mini interface: Cambrian data and the 16 real benchmarks.

Both become ``VqaSample`` lists, so the probe, the two training stages and ``evaluate_vqa``
run unchanged. Cambrian jsonl rows are LLaVA conversations; LAION-sourced rows are dropped
as the paper does. Benchmarks load through ``datasets`` from the HF ids in ``BENCHMARKS``
(field names follow those datasets' cards; each adapter turns a row into the prompt
Cambrian's eval scripts use). Images are fetched lazily by id; at this scale the encoder runs
on the fly (``EncoderFeatures``) because 7M × 576 tokens cannot be cached.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from webssl_repro.evaluate.vqa.data import IMAGE, VqaSample, encoder_tokens

# Hub locations checked against the dataset repos' file trees on huggingface.co: both jsonl
# files live under ``jsons/`` (Cambrian-Alignment: ``jsons/alignment_2.5m.jsonl``; Cambrian-10M:
# ``jsons/Cambrian7M_withsystemprompt.jsonl``, beside ``Cambrian7M.jsonl`` and ``Cambrian10M.jsonl``).
# Images ship as split tars (``coco.tar``, ``sam.tar_partNN``, …) that must be downloaded and
# extracted by hand; ``image_root`` is the directory they were extracted into.
CAMBRIAN: dict[str, tuple[str, str]] = {
    "alignment": ("nyu-visionx/Cambrian-Alignment", "jsons/alignment_2.5m.jsonl"),
    "instruction": ("nyu-visionx/Cambrian-10M", "jsons/Cambrian7M_withsystemprompt.jsonl"),
}
LETTERS = "ABCDEFGHIJ"
# The question extensions of Cambrian's eval scripts (each ``*_eval.py``'s default)
MC_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_PROMPT = "Answer the question using a single word or phrase."
NUMBER_PROMPT = "Answer the question using a single number or phrase."  # ChartQA
DIRECT_PROMPT = "Give the short answer directly."  # OCRBench, DocVQA
SQA_PROMPT = "Please answer directly with only the letter of the correct option and nothing else."
MATHVISTA_MC_PROMPT = "First show your reasoning process and then give the final answer."
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")


# ---------------------------------------------------------------- Cambrian training data


#: what marks a Cambrian row's image as LAION's (``evaluate.vqa.data.exclude_laion: true``)
LAION_MARKERS = ("laion",)


def is_laion(record: Mapping[str, Any], markers: Sequence[str] = LAION_MARKERS) -> bool:
    """The paper excludes LAION images: a row whose image path, source or id contains one of
    ``markers`` (case-insensitive). Rows name no source where their folder does not (LLaVA's
    558K captions of LAION / CC / SBU images sit under numbered folders), so a site whose copy
    holds such a subset names its folder among the markers."""
    fields = [str(record.get(k) or "").lower() for k in ("image", "source", "id")]
    return any(m.lower() in f for m in markers for f in fields)


def _turns(conversations: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    out, question = [], None
    for msg in conversations:
        role, text = msg.get("from", msg.get("role")), str(msg.get("value", msg.get("content", "")))
        if role in ("human", "user"):
            question = text if question is None else question + "\n" + text
        elif role in ("gpt", "assistant") and question is not None:
            out.append((question, text))
            question = None
    return out


def cambrian_samples(records: str | Path | Iterable[Mapping[str, Any]], *,
                     laion_markers: Sequence[str] = LAION_MARKERS, image_root: Optional[str | Path] = None,
                     excluded: Optional[list[int]] = None) -> Iterator[VqaSample]:
    """LLaVA-format rows (a jsonl path or dicts) → samples; image ids are paths under ``image_root``.
    Rows ``is_laion`` finds by ``laion_markers`` (none: keep all) are left out and counted in
    ``excluded[0]`` where given.

    Text-only rows (no ``image``) are kept as text-only samples, as Cambrian-7M trains on them.
    """
    if isinstance(records, (str, Path)):
        records = _jsonl(records)
    for rec in records:
        if laion_markers and is_laion(rec, laion_markers):
            if excluded is not None:
                excluded[0] += 1
            continue
        turns = _turns(rec.get("conversations", []))
        if not turns:
            continue
        image = rec.get("image")
        image_id = None if not image else str(Path(image_root) / image) if image_root else str(image)
        (q, a), rest = turns[0], tuple((q2.replace(IMAGE, "").strip(), a2) for q2, a2 in turns[1:])
        yield VqaSample(image_id, q.replace(IMAGE, "").strip(), a, "cambrian", {"id": rec.get("id")}, rest)


def _jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number}: not a JSON record ({err.msg}, column {err.colno})") from None


def cambrian_path(kind: str, local_dir: Optional[str | Path] = None, *, repo: Optional[str] = None,
                  filename: Optional[str | Path] = None) -> str:
    """The jsonl of ``kind`` (alignment | instruction), downloaded from the hub unless it is local.

    ``filename`` (default: ``CAMBRIAN[kind]``) may be an existing local path, used as is;
    otherwise it is looked up under ``local_dir`` and only then fetched from ``repo``.
    """
    default_repo, default_file = CAMBRIAN[kind]
    repo, filename = repo or default_repo, str(filename or default_file)
    if Path(filename).is_file():
        return filename
    if local_dir is not None and (Path(local_dir) / filename).is_file():
        return str(Path(local_dir) / filename)
    if Path(filename).is_absolute():  # a path of the user's, not a file of the hub repo
        raise FileNotFoundError(f"evaluate.vqa.data.{kind}.file: {filename} does not exist")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, repo_type="dataset", local_dir=local_dir)


class EncoderFeatures:
    """``FeatureCache``-compatible source that encodes images on demand (paper-scale training)."""

    def __init__(self, encoder: torch.nn.Module, load: Callable[[str], Any], transform: Callable[[Any], torch.Tensor],
                 tokens: int, device: str | torch.device = "cpu", precision: str = "fp32"):
        self.encoder, self.load, self.transform = encoder.eval(), load, transform
        self.tokens, self.device, self.precision = tokens, device, precision

    def batch(self, image_ids: Sequence[Optional[str]]) -> torch.Tensor:
        from webssl_repro.evaluate.vqa.probe import autocast_context

        real = [i for i in image_ids if i is not None]
        if not real:
            return torch.zeros(len(image_ids), self.tokens, 1)
        images = torch.stack([self.transform(self.load(i)) for i in real]).to(self.device)
        # the frozen encoder runs every Cambrian image once per epoch: in bf16 on CUDA as the probe
        with autocast_context(self.precision, images.device):
            feats = encoder_tokens(self.encoder, images, self.tokens).float()
        out = feats.new_zeros(len(image_ids), *feats.shape[1:])
        out[torch.tensor([i is not None for i in image_ids])] = feats
        return out


def open_image(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ---------------------------------------------------------------- the 16 benchmarks

Row = Mapping[str, Any]
Adapted = Optional[tuple[str, str, dict[str, Any]]]


def _options(question: str, choices: Sequence[str], *, label: bool = True, extension: str = MC_PROMPT) -> str:
    """Cambrian's multiple-choice prompt: the question (+ " Options:"), "A. …" lines, the extension."""
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([question + (" Options:" if label else ""), *lines, extension])


def _image_key(image: Any) -> str:
    """A short digest of an image's pixels (a PIL image; anything else by its text)."""
    data = image.tobytes() if hasattr(image, "tobytes") else str(image).encode()
    return hashlib.md5(data).hexdigest()[:12]


def _clean(values: Iterable[Any]) -> list[str]:
    return [str(v) for v in values if v is not None and str(v).strip() and str(v) != "nan"]


def _mme(r: Row) -> Adapted:
    if r["category"] not in MME_PERCEPTION:  # MME-P: the 10 perception subtasks only
        return None
    return f"{r['question']}\n{SHORT_PROMPT}", str(r["answer"]), {"subtask": r["category"],
                                                                 "pair_id": r["question_id"]}


def _mmbench(r: Row) -> Adapted:
    """The dev split holds each question under its circularly shifted options: rows of one
    question, image and source form a ``circular_id`` group (Cambrian's ``source_id``)."""
    choices = _clean(r.get(k) for k in "ABCD")
    hint = "".join(_clean([r.get("hint")]))
    question = f"{hint}\n{r['question']}" if hint else r["question"]
    circular = f"{r['question']} {_image_key(r.get('image'))} {r.get('source', '')}"
    return _options(question, choices), str(r["answer"]), {"choices": choices, "circular_id": circular}


def _seed(r: Row) -> Adapted:
    """SEED's image questions only (SEED^I), as Cambrian evaluates: by ``data_type``, and by the
    frames where that column is absent (a video row lists several)."""
    image = r.get("image")
    if r.get("data_type", "image") != "image" or (isinstance(image, (list, tuple)) and len(image) > 1):
        return None
    choices = [str(r[f"choice_{k}"]) for k in "abcd"]
    return _options(r["question"], choices), str(r["answer"]), {"choices": choices}


def _short(r: Row, answers_key: str = "", extension: str = SHORT_PROMPT) -> Adapted:
    meta: dict[str, Any] = {}
    answer = r.get("answer")
    if answers_key:
        meta["answers"] = [str(a) for a in r[answers_key]]
        answer = meta["answers"][0] if answer is None else answer
    return f"{r['question']}\n{extension}", str(answer), meta


def _textvqa(r: Row) -> Adapted:
    """Cambrian's TextVQA prompt lists the dataset's OCR tokens before the extension."""
    _, answer, meta = _short(r, "answers")
    ocr = "".join(f" {t}" if i == 0 else f", {t}" for i, t in enumerate(r.get("ocr_tokens") or []))
    return f"{r['question']}\nReference OCR tokens:{ocr}\n{SHORT_PROMPT}", answer, meta


def _ocrbench(r: Row) -> Adapted:
    answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
    return (f"{r['question']}\n{DIRECT_PROMPT}", str(answers[0]),
            {"answers": [str(a) for a in answers], "subtask": r.get("question_type")})


def _sqa(r: Row) -> Adapted:
    if r.get("image") is None:
        return None
    question = f"{r['hint']} {r['question']}" if r.get("hint") else r["question"]
    return (_options(question, list(r["choices"]), label=False, extension=SQA_PROMPT), LETTERS[int(r["answer"])],
            {"choices": list(r["choices"])})


def _mmmu(r: Row) -> Adapted:
    question = re.sub(r"<image \d+>", "", r["question"]).strip()
    if r.get("question_type") == "multiple-choice":
        # the options list parsed as the Python literal it is; Cambrian's regex ('(.*?)') splits an
        # option holding an apostrophe ("Newton's law"), so a few MMMU prompts differ from its own
        choices = list(ast.literal_eval(r["options"])) if isinstance(r["options"], str) else list(r["options"])
        # Cambrian removes the image markers from the whole prompt, options included
        choices = [re.sub(r"<image \d+>", "", str(c)) for c in choices]
        return _options(question, choices), str(r["answer"]), {"choices": choices}
    return f"{question}\n{SHORT_PROMPT}", str(r["answer"]), {}


def _mathvista(r: Row) -> Adapted:
    """The ``query`` (hint, question, choices) and Cambrian's extensions; a multiple-choice
    answer becomes its option's letter, as Cambrian's eval writes the ground truth."""
    query = str(r.get("query") or r["question"])
    if r.get("question_type") == "multi_choice":
        choices = [str(c) for c in r["choices"]]
        if str(r["answer"]) not in choices:
            raise ValueError(f"mathvista row {r.get('pid', '?')}: answer {r['answer']!r} is none of its choices {choices}")
        return (f"{query}\n{MATHVISTA_MC_PROMPT}", LETTERS[choices.index(str(r["answer"]))],
                {"choices": choices, "answer_type": r.get("answer_type")})
    return f"{query}\n{SHORT_PROMPT}", str(r["answer"]), {"answer_type": r.get("answer_type")}


def _ai2d(r: Row) -> Adapted:
    return (_options(r["question"], list(r["options"]), label=False), LETTERS[int(r["answer"])],
            {"choices": list(r["options"])})


def _mmvp(r: Row) -> Adapted:
    choices = [c.strip() for c in re.split(r"\([a-d]\)", str(r["Options"])) if c.strip()]
    answer = re.sub(r"[^a-d]", "", str(r["Correct Answer"]).lower())[:1].upper()
    return _options(r["Question"], choices), answer, {"choices": choices, "pair_id": (int(r["Index"]) - 1) // 2}


def _realworldqa(r: Row) -> Adapted:
    return str(r["question"]), str(r["answer"]), {}  # the question carries its own instruction


def _cvbench(r: Row) -> Adapted:
    # Official CV-Bench accuracy: mean over sources (2D: ADE20K, COCO; 3D: Omni3D).
    return (f"{r['prompt']}\n{MC_PROMPT}", str(r["answer"]).strip("() "),
            {"choices": list(r["choices"]), "subtask": r["source"]})


@dataclass(frozen=True)
class HfBenchmark:
    path: str
    name: Optional[str]
    split: str
    adapter: Callable[[Row], Adapted]
    image: str = "image"


# Ids, configs, splits and field names checked against each dataset card on huggingface.co
# (``dataset_info``/``configs`` of its README): MME (test; question_id/question/answer/category),
# MMBench (config ``en``, split ``dev``; A–D/hint), SEED-Bench (test), GQA (configs
# ``testdev_balanced_instructions`` / ``testdev_balanced_images``, split ``testdev``), ScienceQA
# (config ``ScienceQA-IMG``, test; choices/answer int), MMMU (validation; image_1/options/
# question_type), MathVista (testmini; decoded_image/query/answer_type), AI2D (test; options,
# answer index as a string), ChartQA (test), OCRBench (test; answer is a list), TextVQA
# (validation; answers), DocVQA (config ``DocVQA``, validation; answers), RealWorldQA (test),
# CV-Bench (configs ``2D``/``3D``, test; prompt/choices/answer/source).
# MMVP: ``MMVP/MMVP`` is an imagefolder whose loader exposes only the image column (its
# Questions.csv is not joined), so the card-documented ``lmms-lab-eval/MMVP`` (split ``train``;
# Index/Question/Options/Correct Answer/image) is used. That copy swaps the ground truth of two
# question pairs that its card documents as mislabelled; Cambrian's own numbers used the original.
# Not verified: SEED-Bench's column names (the lmms-lab card lists no features; taken from the
# SEED-Bench-2 card of the same uploader: choice_a…d, data_type, image as a list).
BENCHMARKS: dict[str, HfBenchmark] = {
    "mme": HfBenchmark("lmms-lab/MME", None, "test", _mme),
    "mmbench": HfBenchmark("lmms-lab/MMBench", "en", "dev", _mmbench),
    "seed": HfBenchmark("lmms-lab/SEED-Bench", None, "test", _seed),
    "gqa": HfBenchmark("lmms-lab/GQA", "testdev_balanced_instructions", "testdev", _short),
    "sqa": HfBenchmark("lmms-lab/ScienceQA", "ScienceQA-IMG", "test", _sqa),
    "mmmu": HfBenchmark("lmms-lab/MMMU", None, "validation", _mmmu, image="image_1"),
    "mathvista": HfBenchmark("AI4Math/MathVista", None, "testmini", _mathvista, image="decoded_image"),
    "ai2d": HfBenchmark("lmms-lab/ai2d", None, "test", _ai2d),
    "chartqa": HfBenchmark("lmms-lab/ChartQA", None, "test", lambda r: _short(r, extension=NUMBER_PROMPT)),
    "ocrbench": HfBenchmark("echo840/OCRBench", None, "test", _ocrbench),
    "textvqa": HfBenchmark("lmms-lab/textvqa", None, "validation", _textvqa),
    "docvqa": HfBenchmark("lmms-lab/DocVQA", "DocVQA", "validation", lambda r: _short(r, "answers", DIRECT_PROMPT)),
    "mmvp": HfBenchmark("lmms-lab-eval/MMVP", None, "train", _mmvp),
    "realworldqa": HfBenchmark("xai-org/RealworldQA", None, "test", _realworldqa),
    "cvbench2d": HfBenchmark("nyu-visionx/CV-Bench", "2D", "test", _cvbench),
    "cvbench3d": HfBenchmark("nyu-visionx/CV-Bench", "3D", "test", _cvbench),
}
#: the sample keys of rows a benchmark scores together (``scorers``: circular accuracy, pairs)
GROUP_KEYS = ("circular_id", "pair_id")
# GQA keeps its images in a sibling config, joined on ``imageId``.
GQA_IMAGES = ("lmms-lab/GQA", "testdev_balanced_images", "testdev")


def open_dataset(path: str | Path, name: Optional[str] = None, split: Optional[str] = None):
    """One split of a dataset: a hub id, or a local directory (``save_to_disk`` output, or a
    local copy of the hub repo's files, which ``load_dataset`` reads with the same config names)."""
    local = Path(path)
    if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(local))
        if isinstance(data, DatasetDict):
            if split not in data:
                raise KeyError(f"{path}: no split {split!r}; has {sorted(data)}")
            data = data[split]
        return data
    from datasets import load_dataset

    return load_dataset(str(path), name, split=split)


def load_benchmark(name: str, dataset: Any = None, images: Any = None,
                   limit: Optional[int] = None) -> tuple[list[VqaSample], Callable[[str], Any]]:
    """Samples of one real benchmark and an image getter by ``image_id``.

    ``dataset`` (and, for GQA, ``images``) replace the hub download — tests pass small local
    ``datasets.Dataset`` objects built with the real field names. ``limit`` keeps the first
    ``limit`` samples and, where the benchmark scores groups of rows together (MMBench's
    circular shifts, MME's and MMVP's pairs: ``GROUP_KEYS``), every row of their groups, found
    anywhere in the split: a group cut short would be scored as if whole.
    """
    spec = BENCHMARKS[name]
    if dataset is None:
        dataset = open_dataset(spec.path, spec.name, spec.split)
    samples: list[VqaSample] = []
    groups: set[tuple[str, str]] = set()
    for i, row in enumerate(dataset):
        adapted = spec.adapter(row)
        if adapted is None:
            continue
        question, answer, meta = adapted
        group = next(((k, str(meta[k])) for k in GROUP_KEYS if k in meta), None)
        if limit is not None and len(samples) >= limit:
            if group is None:
                break
            if group not in groups:
                continue
        if group is not None:
            groups.add(group)
        samples.append(VqaSample(f"{name}/{i}", question, answer, name, meta))
    if name == "gqa":
        if images is None:
            images = open_dataset(*GQA_IMAGES)
        by_id = {str(i): k for k, i in enumerate(images["id"])}  # the id column alone: no image decoding

        def gqa_image(image_id: str) -> Any:
            return images[by_id[str(dataset[int(image_id.rsplit("/", 1)[1])]["imageId"])]]["image"]

        return samples, gqa_image

    def image(image_id: str) -> Any:
        value = dataset[int(image_id.rsplit("/", 1)[1])][spec.image]
        return value[0] if isinstance(value, list) else value

    return samples, image

