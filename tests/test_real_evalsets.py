"""Paper-scale eval sets through `datasets`, on tiny local stand-ins (no download)."""
import json

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from webssl_repro.data.real_evalsets import build_hf_manifest, load_hf_split  # noqa: E402
from webssl_repro.data.stages import build_evalset  # noqa: E402


def _img(v):
    return Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8))


def test_adapters_give_the_mini_record_layout():
    seg = datasets.Dataset.from_list([{"image": _img(10), "annotation": Image.fromarray(
        np.array([[0, 1], [150, 2]], dtype=np.uint8)), "scene_category": 0}])
    records = load_hf_split(build_hf_manifest("segmentation", {}), "val", seg)
    assert records[0]["seg"].tolist() == [[255, 0], [149, 1]]  # 0 = "other" is ignored, classes shift down
    cls = datasets.Dataset.from_list([{"image": _img(v), "label": v} for v in (3, 7)])
    records = load_hf_split(build_hf_manifest("classification", {"limit": 1}), "train", cls)
    assert len(records) == 1 and records[0]["label"] == 3 and records[0]["image"].size == (8, 8)
    cap = datasets.Dataset.from_list([{"image": _img(1), "text": ["a red ball", "second caption"]}])
    assert load_hf_split(build_hf_manifest("captions", {}), "test", cap)[0]["caption"] == "a red ball"
    depth = datasets.Dataset.from_list([{"image": _img(1), "depth_map": np.ones((2, 2), dtype=np.float32).tolist()}])
    assert load_hf_split(build_hf_manifest("depth", {}), "val", depth)[0]["depth"].dtype == np.float32


def test_paper_scale_evalset_rule_writes_a_dataset_manifest(tmp_path):
    out = tmp_path / "classification.json"
    build_evalset("classification", {"source": "hf", "classification": {"dataset": "/data/imagenet"}}, str(out))
    manifest = json.loads(out.read_text())
    assert manifest["source"] == "hf" and manifest["dataset"] == "/data/imagenet"
    assert manifest["splits"] == {"train": "train", "val": "validation"}
    with pytest.raises(KeyError, match="datset"):
        build_hf_manifest("classification", {"datset": "x"})
    with pytest.raises(ValueError, match="test"):
        load_hf_split(manifest, "test", [])
