"""The paper's own filter: ask a small MLLM (SmolVLM2) the light/heavy prompt, keep on "yes".

The paper gives neither checkpoint size nor decoding nor parsing (paper_facts §6); we use
greedy decoding of ``max_new_tokens`` (3) tokens and keep an image iff the answer, after
stripping leading whitespace and punctuation, starts with the word "yes" (case-insensitive). Anything
else - "no", an empty or off-topic answer - drops the image, which is the conservative
reading of "Answer only yes or no". Batches are left-padded so every row's generation
starts right after its own prompt.
"""
from __future__ import annotations

import re
import string
import warnings
from typing import Any, Callable, Sequence

from PIL import Image

from webssl_repro.data.filters import PROMPTS, TextFilter, _check_variants
from webssl_repro.files import pinned_revision

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
GenerateFn = Callable[[Sequence[Image.Image], str], list[str]]


#: answers that are neither yes nor no a filter warns about: enough to show a prompt or chat
#: template the model does not follow in a job's first minutes, not a line per image after it
WARN_OFF_TOPIC = 5


def _first_word_is(word: str, answer: str) -> bool:
    return re.match(rf"{word}\b", str(answer).lstrip(string.whitespace + string.punctuation).lower()) is not None


def parse_yes(answer: str) -> bool:
    """True iff the answer's first word is "yes" ("Yes.", "**yes**, it does"; not "yesterday")."""
    return _first_word_is("yes", answer)


class MLLMFilter(TextFilter):
    """``model`` is a hub id or a local directory; ``revision`` pins a hub id's commit (or tag),
    so that a corpus filtered in thousands of jobs over days is decided by one model even if the
    repository changes meanwhile; ``generate_fn`` replaces the model entirely."""

    name = "mllm"

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int = 3, batch_size: int = 8, generate_fn: GenerateFn | None = None,
                 image_size: int | None = None, revision: str | None = None) -> None:
        self.model_name, self.device, self.dtype, self.revision = model, device, dtype, revision
        # a pinned commit is a hub id's: a local directory is the copy it is (checked by the dry run
        # too, plan_checks.check_filter, which builds the filter: loading is lazy)
        if generate_fn is None:
            pinned_revision(revision, model, "data.filter.revision", "data.filter.model")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.generate_fn = generate_fn
        self.image_size = image_size
        self._processor: Any = None
        self._model: Any = None
        self.off_topic = 0  # answers that begin with neither yes nor no, dropped as a no

    def _load_processor(self) -> Any:
        if self._processor is None:
            import transformers

            from webssl_repro.files import hub_access, model_location

            location = model_location(self.model_name, "data.filter.model")
            with hub_access("data.filter.model", location):
                self._processor = transformers.AutoProcessor.from_pretrained(location, **self._pinned())
            self._processor.tokenizer.padding_side = "left"
        return self._processor

    def _load(self) -> None:
        import torch
        import transformers

        from webssl_repro.files import hub_access, model_location

        location = model_location(self.model_name, "data.filter.model")
        self._load_processor()
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        with hub_access("data.filter.model", location):
            model = auto.from_pretrained(location, dtype=getattr(torch, self.dtype), **self._pinned())
        self._model = model.to(self.device).eval()

    def _pinned(self) -> dict[str, str]:
        return {"revision": self.revision} if self.revision else {}  # a local directory has none (__init__)

    def prepare(self, sample: Any) -> Image.Image:
        img = sample["image"]
        if self.image_size and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        return img

    def _inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """The processor's CPU tensors (image splitting and resizing: ~27 ms per 512x384 image on
        one core with SmolVLM2's splitting, the costly part of a batch besides generation)."""
        processor = self._load_processor()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return processor(text=[text] * len(images), images=[[im.convert("RGB")] for im in images],
                         return_tensors="pt", padding=True)

    def _generate(self, inputs: Any) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            out = self._model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in self._processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def _hf_generate(self, images: Sequence[Image.Image], prompt: str) -> list[str]:
        return self._generate(self._inputs(images, prompt))

    def encode(self, images: Sequence[Image.Image], variants: Sequence[str]) -> Any:
        """Each variant's processor tensors, made in a loader worker where the job has some."""
        if self.generate_fn is not None:  # a stand-in model takes the images themselves
            return list(images)
        _check_variants(variants)
        return {v: self._inputs(images, PROMPTS[v]) for v in variants}

    def decide_encoded(self, encoded: Any, variants: Sequence[str]) -> dict[str, list[bool]]:
        if self.generate_fn is not None:
            return self.decide(encoded, variants)
        return {v: self._keep(self._generate(encoded[v])) for v in variants}

    def answers(self, images: Sequence[Image.Image], prompt: str) -> list[str]:
        gen = self.generate_fn or self._hf_generate
        out: list[str] = []
        for k in range(0, len(images), self.batch_size):
            chunk = list(images[k:k + self.batch_size])
            got = gen(chunk, prompt)
            if len(got) != len(chunk):
                raise RuntimeError(f"MLLMFilter: {len(got)} answers for {len(chunk)} images")
            out.extend(got)
        return out

    def decide(self, images: Sequence[Image.Image], variants: Sequence[str] = ("light", "heavy")) -> dict[str, list[bool]]:
        _check_variants(variants)
        return {v: self._keep(self.answers(images, PROMPTS[v])) for v in variants}

    def _keep(self, answers: Sequence[str]) -> list[bool]:
        """``parse_yes`` of each answer; one that is not a no either (a prompt or chat template the
        model does not follow reads as a no for every image) is warned about, the first few."""
        keep = [parse_yes(a) for a in answers]
        for answer, kept in zip(answers, keep):
            if not kept and not _first_word_is("no", answer):
                self.off_topic += 1
                if self.off_topic <= WARN_OFF_TOPIC:
                    last = " (the last such warning of this job)" if self.off_topic == WARN_OFF_TOPIC else ""
                    warnings.warn(f"data filter ({self.model_name}): answer {answer!r} begins with neither yes nor "
                                  f"no; the image is dropped{last}", RuntimeWarning, stacklevel=2)
        return keep
