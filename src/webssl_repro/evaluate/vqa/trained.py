"""The trained VQA probe as the output of its own job (``results/{scale}/evals/{run}/vqa_probe/``).

Training the probe (two stages of an 8B LM at paper scale) and answering the 16 benchmarks with
it are two jobs: a change to what only the answering reads (``config.ANSWER_KEYS``: answer
lengths, the eval batch, which benchmarks and how many of their questions) reruns the answers,
not the training. The folder holds:

* ``weights/``: every parameter of the probe (projector and LM) through
  ``torch.distributed.checkpoint``, so that under FSDP2 each rank writes and reads its own
  shards (an 8B LM in fp32 is 32 GB; no rank gathers it). Frozen parameters are saved too: the
  folder does not depend on the pretrained LM's files staying as they were.
* ``tokenizer/``: the word-level tokenizer a ``tiny`` LM was built with (mini), which depends on
  the training texts; a hub LM's tokenizer is its own.
* ``probe.json``, written last: the run, the hash of the configuration it was trained with
  (``config.probe_section``), the fingerprint of the encoder whose tokens it was trained on,
  each stage's log and the training data's counts. The answer job refuses a probe whose hash is
  not that of its own configuration, or which another encoder trained (a run pretrained again).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from webssl_repro.config import config_hash
from webssl_repro.evaluate.vqa.config import probe_section
from webssl_repro.files import read_json, write_json
from webssl_repro.train.checkpoint import dcp_load, dcp_save
from webssl_repro.train.distributed import barrier, is_main

WEIGHTS = "weights"
TOKENIZER = "tokenizer"
RECORD = "probe.json"


def probe_hash(section: Mapping[str, Any]) -> str:
    """The hash of what a trained probe depends on in ``evaluate.vqa`` (settings left out)."""
    from webssl_repro.settings import SETTINGS, split_settings

    return config_hash(split_settings(probe_section(section), SETTINGS["vqa"])[0])


def save_probe(directory: str | Path, probe: nn.Module, record: Mapping[str, Any], *,
               tokenizer: Any = None) -> None:
    """Write the probe's parameters, ``tokenizer`` (a ``tiny`` LM's) and ``record`` into
    ``directory``; collective over the ranks, ``record`` last, by rank 0."""
    directory = Path(directory)
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    dcp_save({"model": get_model_state_dict(probe)}, directory / WEIGHTS)
    if is_main():
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory / TOKENIZER))
        write_json(directory / RECORD, {**record, "tokenizer": tokenizer is not None}, indent=2, sort_keys=True)
    barrier()


def read_record(directory: str | Path, section: Mapping[str, Any], run: Optional[str] = None) -> dict[str, Any]:
    """``probe.json`` of a trained probe, checked against the answering job's ``evaluate.vqa``
    (``section``, as written: the hash does not fill in code defaults) and, where given, its
    ``run``: a probe trained with another configuration or for another run is refused, by name."""
    path = Path(directory) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a trained VQA probe (no {RECORD}; "
                                "`webssl-repro evaluate vqa_probe` writes one)")
    record = read_json(path)
    if run is not None and record.get("run") != run:
        raise ValueError(f"{path}: the probe of run {record.get('run')!r}, not of {run!r}")
    expected = probe_hash(section)
    if record.get("config_hash") != expected:
        raise ValueError(f"{path}: the probe was trained with evaluate.vqa of hash {record.get('config_hash')}, "
                         f"this job's is {expected} (its recipe differs: a key of evaluate.vqa other than the "
                         f"settings and {', '.join(_answer_keys())}): train it again (the vqa_probe rule) or "
                         "answer with the configuration it was trained with")
    return record


def check_encoder(directory: str | Path, record: Mapping[str, Any], fingerprint: str) -> None:
    """Refuse a probe trained on another encoder's tokens (``features.encoder_fingerprint``): the
    run pretrained again, or another run's probe copied under this run's name. A record written
    before fingerprints were kept has none and is taken as it is."""
    trained_on = record.get("encoder")
    if trained_on is not None and trained_on != fingerprint:
        raise ValueError(f"{Path(directory) / RECORD}: the probe was trained on the tokens of another encoder "
                         f"(fingerprint {trained_on[:12]}, this job's {fingerprint[:12]}): the run was pretrained "
                         "again since; train its probe again (the vqa_probe rule)")


def _answer_keys() -> list[str]:
    from webssl_repro.evaluate.vqa.config import ANSWER_DATA_KEYS, ANSWER_KEYS

    return [*ANSWER_KEYS, *(f"data.{k}" for k in ANSWER_DATA_KEYS)]


def load_tokenizer_of(directory: str | Path) -> Any:
    """The tokenizer a ``tiny`` probe was trained with (``save_probe``)."""
    from webssl_repro.evaluate.vqa.lm import load_tokenizer

    path = Path(directory) / TOKENIZER
    if not path.is_dir():
        raise FileNotFoundError(f"{directory}: a tiny-LM probe without its {TOKENIZER}/ folder")
    return load_tokenizer(path)


def load_probe(directory: str | Path, probe: nn.Module) -> None:
    """Load ``save_probe``'s parameters into ``probe``, built from the same configuration (and
    already sharded, under FSDP2); collective."""
    state = {"model": get_model_state_dict(probe)}
    try:
        dcp_load(state, Path(directory) / WEIGHTS)
    except ValueError as err:  # a shard cut short or gone: the training job's advice does not apply
        cause = err.__cause__ if err.__cause__ is not None else err
        last = (str(cause).strip().splitlines() or [""])[-1]  # DCP's message carries each rank's traceback
        raise ValueError(f"{directory}: the trained probe's weights cannot be read ({type(cause).__name__}: {last}); "
                         "remove the folder, and its vqa_probe job trains the probe again") from err
    set_model_state_dict(probe, state["model"])
