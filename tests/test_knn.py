"""DINO's weighted k-NN and the IN-1k-analogue attribute labels."""
from __future__ import annotations

import pytest
import torch

from webssl_repro.evaluate.knn import attribute_label, knn_top1, object_attributes


def test_knn_weights_votes_by_similarity():
    # Query [1, 0.1]: train rows at cosine 0.995 (class 0) and 0.1 / 0.0 (class 1, two of them).
    # Unweighted majority (k=3) says class 1; exp(sim/0.07) weights make class 0 win.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.1]]), torch.tensor([0])
    assert knn_top1(train, labels, query, truth, n_classes=2, k=3) == 100.0
    assert knn_top1(train, labels, query, truth, n_classes=2, k=3, temperature=100.0) == 0.0  # ~unweighted


def test_knn_rejects_more_neighbours_than_rows():
    with pytest.raises(ValueError, match="k=20"):
        knn_top1(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), torch.zeros(2), 2)


def test_attribute_labels_of_an_in1k_analogue_record():
    record = {"label": 3, "meta": {"objects": [{"class": "star", "colour": "blue", "texture": "dotted"}]}}
    names = object_attributes()
    assert names["class"][attribute_label(record, "class")] == "star"
    assert names["colour"][attribute_label(record, "colour")] == "blue"
    assert names["texture"][attribute_label(record, "texture")] == "dotted"
