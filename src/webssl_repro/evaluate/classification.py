"""IN-1k linear of a frozen encoder (the first column of paper Tables 3/7/9), resumable.

Two pieces of work, each continued by the retry of a classic job that stopped at its time limit
(``evaluate.progress``), to the number an uninterrupted job computes:

* the feature pass: each split's linear-probe inputs (``features.linear_features``), in order.
  With a state directory and no ``scratch`` they are memory-mapped files in its
  ``linear_features/<split>`` folder; each save flushes them and records the rows written, so a
  stopped pass continues at the next row, and a finished split is the part ``features.<split>``.
  At paper scale this is a ViT-7B forward over ImageNet's 1.33M images on the job's one GPU.
* the training of the linear grid (``linear.linear_probe``): heads, momentum buffers and
  sampler, saved as the dense heads' are (part ``classification``, then its result).

With ``scratch`` set, or without a state directory, the features go to a temporary folder under
``scratch`` (or stay in memory when they fit) and a retry computes them again.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

from webssl_repro.evaluate.features import linear_features, linear_files_intact, model_device
from webssl_repro.evaluate.imagesets import EvalImages, load_split
from webssl_repro.evaluate.linear import linear_probe
from webssl_repro.evaluate.probe_batches import autocast_dtype, in_order_batches
from webssl_repro.evaluate.progress import EvalProgress

#: The state directory's folder of the features (``EvalProgress.files``).
FEATURES = "linear_features"
SPLITS = ("train", "val")


def classification(encoder, meta: Mapping[str, Any], manifest: str | Path, cfg: Mapping[str, Any],
                   progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """Top-1 % of the best head of DINOv2's linear grid, on the normed CLS of the last 4 blocks
    (and the last block's mean patch token) at the pretraining resolution."""
    progress = EvalProgress() if progress is None else progress
    size, n_blocks = int(meta["img_size"]), min(4, int(meta["depth"]))
    kept = progress.files(FEATURES) if cfg["scratch"] is None else None
    with contextlib.ExitStack() as stack:
        scratch = None if kept is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(dir=cfg["scratch"], prefix="linear_features_")))
        feats = {}
        for split in SPLITS:
            images = EvalImages(load_split(manifest, split), size, "label")
            if kept is not None:
                feats[split] = split_features(encoder, images, n_blocks, cfg, progress, split, kept / split)
            else:
                (scratch / split).mkdir()
                feats[split] = linear_features(encoder, in_order_batches(images, cfg), len(images), n_blocks,
                                               scratch=scratch / split, autocast_dtype=autocast_dtype(cfg))
        n_classes = int(max(feats["train"]["labels"].max(), feats["val"]["labels"].max())) + 1
        lin = cfg["linear"]
        total = int(lin["epochs"]) * int(lin["epoch_length"])
        result = linear_probe(feats["train"], feats["val"], n_classes, n_last_blocks=(1, n_blocks),
                              lrs=lin["lrs"], batch_size=min(int(lin["batch_size"]), len(feats["train"]["labels"])),
                              epochs=int(lin["epochs"]), epoch_length=int(lin["epoch_length"]),
                              seed=int(cfg["seed"]), device=model_device(encoder),
                              state=progress.torch_state("classification"),
                              checkpoint=progress.torch_saver("classification", total))
    setting = result.setting
    return {"in1k_linear": float(result.top1),  # already a percentage
            "_in1k_linear_setting": {"n_last_blocks": setting.n_last_blocks, "avgpool": setting.avgpool,
                                     "lr": setting.lr}}


def split_features(encoder, images: EvalImages, n_blocks: int, cfg: Mapping[str, Any], progress: EvalProgress,
                   split: str, folder: Path) -> dict:
    """One split's features in ``folder``, continued from the rows a stopped pass saved, or
    read back once the split's part is finished. Files that are not whole, or of another
    shape, are written anew from the first row, and a saved row count about them is dropped."""
    part, n = f"features.{split}", len(images)
    shape = (n, n_blocks + 1, int(encoder.embed_dim))
    intact = linear_files_intact(folder, shape)
    if progress.result(part) is not None and intact:
        return linear_features(encoder, iter(()), n, n_blocks, files=(folder, shape[-1]))
    state = progress.torch_state(part)
    if state is not None and not intact:
        progress.drop(part)
        state = None
    rows, first = (0, 0) if state is None else (int(state["rows"]), int(state["iteration"]))
    batch = int(cfg["batch_size"])
    saver = progress.torch_saver(part, first + math.ceil((n - rows) / batch), final_save=False)

    def after_batch(done: int, flush) -> None:
        def make_state() -> dict[str, Any]:
            flush()  # the rows are on disk before the pointer says so
            return {"iteration": first + done, "rows": min(n, rows + done * batch)}

        saver(first + done, make_state)

    feats = linear_features(encoder, in_order_batches(images, cfg, start=rows), n, n_blocks,
                            autocast_dtype=autocast_dtype(cfg), files=(folder, shape[-1]), after_batch=after_batch)
    progress.finish(part, {"rows": n})  # linear_features flushed the rows: the files are whole
    return feats
