"""DINO's weighted k-NN classifier on frozen features (k=20, T=0.07 in DINO / DINOv2).

Cheap and hyper-parameter-free, so it is the quickest read of what an encoder's features
separate: the mini learning checks and diagnostics use it on the IN-1k analogue.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             n_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in %: each test row votes over its k most cosine-similar train rows,
    each vote weighted by exp(similarity / T)."""
    if len(train_x) < k:
        raise ValueError(f"knn_top1: k={k} neighbours asked of {len(train_x)} train rows")
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    sim, idx = (test_x @ train_x.T).topk(k, dim=1)
    train_y, test_y = train_y.to(sim.device), test_y.to(sim.device)
    votes = torch.zeros(len(test_x), n_classes, device=sim.device).scatter_add_(1, train_y[idx],
                                                                               (sim / temperature).exp())
    return 100.0 * float((votes.argmax(1) == test_y).float().mean())


def _cls(encoder: Any, x: torch.Tensor) -> torch.Tensor:
    """The CLS tokens of ``x`` in eval mode (no drop-path), on the encoder's device."""
    from webssl_repro.evaluate.features import model_device

    encoder.eval()
    return encoder.forward_features_dict(x.to(model_device(encoder)))["x_norm_clstoken"].cpu()


def object_attributes() -> dict[str, tuple[str, ...]]:
    """What a k-NN can be asked to predict on the IN-1k analogue: the class (a shape), or an
    attribute of the object that the mini-web world draws independently of the class."""
    from webssl_repro.data.miniweb.world import COLOUR_NAMES, OBJECT_CLASSES, TEXTURES

    return {"class": OBJECT_CLASSES, "colour": COLOUR_NAMES, "texture": TEXTURES}


def attribute_label(record: dict, attribute: str) -> int:
    """The id of ``attribute`` for one IN-1k-analogue record (``label`` and ``meta`` as built
    by ``data.evalsets.classic_items``)."""
    if attribute == "class":
        return int(record["label"])
    values = object_attributes()[attribute]
    return values.index(record["meta"]["objects"][0][attribute])


def attribute_knn(encoders: Mapping[str, Any], records: Mapping[str, Sequence[dict]], size: int
                  ) -> dict[str, dict[str, float]]:
    """k-NN top-1 % of every ``object_attributes`` target for each encoder's CLS token and for
    raw pixels (``"pixels"``): ``{attribute: {name: accuracy}}``. ``records`` holds the
    ``train`` and ``val`` IN-1k-analogue records; each encoder runs once over each split."""
    from webssl_repro.evaluate.imagesets import CLASSIFY_CROP, images_tensor

    images = {split: images_tensor(records[split], size, "crop", CLASSIFY_CROP) for split in ("train", "val")}
    with torch.no_grad():
        feats = {name: {split: _cls(enc, x) for split, x in images.items()} for name, enc in encoders.items()}
    feats["pixels"] = {split: x.flatten(1) for split, x in images.items()}
    table: dict[str, dict[str, float]] = {}
    for attribute, values in object_attributes().items():
        y = {split: torch.tensor([attribute_label(r, attribute) for r in records[split]]) for split in images}
        table[attribute] = {name: knn_top1(f["train"], y["train"], f["val"], y["val"], len(values))
                            for name, f in feats.items()}
    return table
