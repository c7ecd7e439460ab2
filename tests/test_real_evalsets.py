"""Paper-scale eval sets through `datasets`, on tiny local stand-ins (no download)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from webssl_repro.data.real_evalsets import build_hf_manifest, load_hf_split  # noqa: E402
from webssl_repro.data.stages import build_evalset  # noqa: E402


def _img(v):
    return Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8))


def test_adapters_give_the_mini_record_layout():
    seg = datasets.Dataset.from_list([{"image": _img(10), "annotation": Image.fromarray(
        np.array([[0, 1], [150, 2]], dtype=np.uint8)), "scene_category": 0}])
    records = load_hf_split(build_hf_manifest("segmentation", {"dataset": "org/ade20k"}), "val", seg)
    assert records[0]["seg"].tolist() == [[255, 0], [149, 1]]  # 0 = "other" is ignored, classes shift down
    cls = datasets.Dataset.from_list([{"image": _img(v), "label": v} for v in (3, 7)])
    records = load_hf_split(build_hf_manifest("classification", {"limit": 1}), "train", cls)
    assert len(records) == 1 and records[0]["label"] == 3 and records[0]["image"].size == (8, 8)
    cap = datasets.Dataset.from_list([{"image": _img(1), "text": ["a red ball", "second caption"]}])
    assert load_hf_split(build_hf_manifest("captions", {}), "test", cap)[0]["caption"] == "a red ball"
    depth = datasets.Dataset.from_list([{"image": _img(1), "depth_map": np.ones((2, 2), dtype=np.float32).tolist()}])
    assert load_hf_split(build_hf_manifest("depth", {"dataset": "org/nyu"}), "val", depth)[0]["depth"].dtype == np.float32


def test_an_ade20k_copy_already_reduced_is_refused_by_dataset_and_row():
    """mmseg's prepared ADE20K (0..149, 255 = ignore) reduced again would shift every class down
    and turn 255 into 254, which the probe's loss refuses hours later without naming a file."""
    rows = [{"image": _img(1), "annotation": Image.fromarray(np.array([[0, 150]], dtype=np.uint8))},
            {"image": _img(1), "annotation": Image.fromarray(np.array([[255, 0], [149, 3]], dtype=np.uint8))}]
    records = load_hf_split(build_hf_manifest("segmentation", {"dataset": "org/ade20k"}), "val", rows)
    assert records[0]["seg"].tolist() == [[255, 149]]
    with pytest.raises(ValueError, match=r"data.evalsets.segmentation.dataset org/ade20k, row 1: annotation holds "
                                         r"values 0..255: expected ADE20K's 0 \(other\) and classes 1..150; a copy "
                                         r"already reduced"):
        records[1]


@pytest.mark.parametrize("depth_map,shown", [(np.full((2, 2), 2500, dtype=np.uint16), "uint16 with values up to 2500"),
                                             (np.full((2, 2), 2500.0, dtype=np.float32), "float32 with values up to 2500")])
def test_a_depth_copy_in_millimetres_is_refused_by_dataset_and_row(depth_map, shown):
    """NYUd from the BTS / DINOv2 files holds millimetres: read as metres, nearly every pixel would
    fall outside the 10 m bins and the probe would score on almost nothing, silently."""
    rows = [{"image": _img(1), "depth_map": np.ones((2, 2), dtype=depth_map.dtype)},
            {"image": _img(1), "depth_map": Image.fromarray(depth_map) if depth_map.dtype == np.uint16 else depth_map}]
    records = load_hf_split(build_hf_manifest("depth", {"dataset": "org/nyu"}), "val", rows)
    with pytest.raises(ValueError, match=rf"data.evalsets.depth.dataset org/nyu, row 1: depth_map is {shown}: "
                                         r"expected float metres .* divided by 1000"):
        records[1]
    if depth_map.dtype == np.uint16:
        with pytest.raises(ValueError, match="row 0: depth_map is uint16 with values up to 1"):
            records[0]  # integer maps are refused whatever their values
    else:
        assert records[0]["depth"].max() == 1.0
        holes = np.array([[1.5, np.nan], [np.inf, 2500.0]], dtype=np.float32)  # pixels without depth: not a unit
        rows = [{"image": _img(1), "depth_map": holes[:1]}, {"image": _img(1), "depth_map": holes}]
        records = load_hf_split(build_hf_manifest("depth", {"dataset": "org/nyu"}), "val", rows)
        assert records[0]["depth"].tolist() == [[1.5, 0.0]]  # no depth: 0, as NYUd marks it
        with pytest.raises(ValueError, match=rf"row 1: depth_map is {shown}: "):
            records[1]


def test_paper_scale_evalset_rule_writes_a_dataset_manifest(tmp_path):
    out, local = tmp_path / "classification.json", tmp_path / "imagenet"
    local.mkdir()
    build_evalset("classification", {"source": "hf", "classification": {"dataset": str(local)}}, str(out))
    manifest = json.loads(out.read_text())
    assert manifest["source"] == "hf" and manifest["dataset"] == str(local)
    assert manifest["splits"] == {"train": "train", "val": "validation"}
    with pytest.raises(KeyError, match="datset"):
        build_hf_manifest("classification", {"datset": "x"})
    with pytest.raises(ValueError, match="test"):
        load_hf_split(manifest, "test", [])
    # a local copy that is not there stops the manifest's job, not every evaluation that reads it
    with pytest.raises(ValueError, match=r"data.evalsets.classification.dataset: /datasets/nonexistent-imagenet does "
                                         r"not exist"):
        build_hf_manifest("classification", {"dataset": "/datasets/nonexistent-imagenet"})


def test_a_saved_copy_loads_and_a_script_dataset_is_refused_by_key(tmp_path):
    """ADE20K's and NYUd's default hub ids ship loading scripts, which datasets >= 4 refuses:
    the error names the key to point at a copy, and a save_to_disk copy is read in place."""
    rows = {split: datasets.Dataset.from_list([{"image": _img(v), "label": v}]) for split, v in
            (("train", 1), ("validation", 2))}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "imagenet"))
    manifest = build_hf_manifest("classification", {"dataset": str(tmp_path / "imagenet")})
    renamed = datasets.Dataset.from_list([{"img": _img(1), "cls": 1}])
    with pytest.raises(ValueError, match=r"data.evalsets.classification.dataset .*imagenet: rows lack column 'image' "
                                         r"\(they have \['cls', 'img'\]\)"):
        load_hf_split(manifest, "val", renamed)[0]
    assert load_hf_split(manifest, "val")[0]["label"] == 2 and len(load_hf_split(manifest, "train")) == 1
    with pytest.raises(ValueError, match=r"data.evalsets.classification.dataset: .* no split 'test'"):
        load_hf_split({**manifest, "splits": {"val": "test"}}, "val")
    # load_dataset's split syntax, which load_from_disk alone does not read
    sliced = {**manifest, "splits": {"val": "train[:1]+validation", "train": "validation[:0]"}}
    assert [r["label"] for r in load_hf_split(sliced, "val")] == [1, 2] and len(load_hf_split(sliced, "train")) == 0
    with pytest.raises(ValueError, match=r"data.evalsets.classification.splits: 'validation\[:1' is not a split"):
        load_hf_split({**manifest, "splits": {"val": "validation[:1"}}, "val")

    scripted = tmp_path / "scene_parse_150"
    scripted.mkdir()
    (scripted / "scene_parse_150.py").write_text("import datasets\n")
    with pytest.raises(ValueError, match=r"data.evalsets.segmentation.dataset: .*scene_parse_150 is a hub dataset "
                                         r"with a loading script.*DatasetDict.save_to_disk"):
        load_hf_split(build_hf_manifest("segmentation", {"dataset": str(scripted)}), "val")


def test_a_script_dataset_is_refused_by_key_on_datasets_3(monkeypatch):
    """datasets 2.x / 3.x refuse a loading script with their own message (no trust_remote_code)."""
    def refuse(name, *a, **kw):
        raise ValueError(f"The repository for {name} contains custom code which must be executed to correctly "
                         "load the dataset. Please pass the argument `trust_remote_code=True` to allow custom "
                         "code to be run.")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(ValueError, match=r"data.evalsets.depth.dataset: sayakpaul/nyu_depth_v2 is a hub dataset "
                                         r"with a loading script"):
        load_hf_split(build_hf_manifest("depth", {"dataset": "sayakpaul/nyu_depth_v2"}), "val")


def test_real_images_of_mixed_sizes_and_ade20k_classes(tmp_path):
    """ImageNet / ADE20K images come in many sizes: each is resized to the probe's square
    before stacking (labels by nearest neighbour, so no class is invented). The segmentation
    heads size their output by the manifest: 150 ADE20K classes, not the mini world's 20."""
    from webssl_repro.data.miniweb.world import SEG_CLASSES
    from webssl_repro.evaluate.classic import segmentation_classes
    from webssl_repro.evaluate.imagesets import EvalImages

    rows = []
    for h, w in ((375, 500), (500, 333)):
        ann = np.zeros((h, w), dtype=np.uint8)
        ann[: h // 2] = 150  # top half: ADE20K class 150 -> 149; bottom half: "other" -> ignored
        rows.append({"image": Image.fromarray(np.full((h, w, 3), 200, dtype=np.uint8)),
                     "annotation": Image.fromarray(ann), "scene_category": 0})
    manifest = build_hf_manifest("segmentation", {"dataset": "org/ade20k"})
    records = load_hf_split(manifest, "val", datasets.Dataset.from_list(rows))
    x, y = (torch.stack(t) for t in zip(*EvalImages(records, 32, "seg")))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32)
    assert y.dtype == torch.long and set(y.unique().tolist()) == {149, 255} and (y[:, :8] == 149).all() and (y[:, -8:] == 255).all()
    path = tmp_path / "segmentation.json"
    path.write_text(json.dumps(manifest))
    assert segmentation_classes(path) == 150
    build_evalset("segmentation", {"size": 16, "segmentation": {"train": 2, "val": 1}}, str(tmp_path / "mini.json"))
    assert segmentation_classes(tmp_path / "mini.json") == len(SEG_CLASSES) == 20


def test_eval_transforms_match_torchvision_and_mmcv():
    """Classification gets DINOv2's eval transform, Resize(256 for 224) + CenterCrop, aspect
    kept; alignment the shorter side resized + centre crop; VQA Cambrian's pad to a square
    with the mean colour: anti-aliased bicubic, as torchvision's. Dense probes resize to their
    (h, w) or shorter side as mmcv does (OpenCV, the backend mmseg's pipelines use)."""
    import cv2  # OpenCV comes with rapidocr-onnxruntime
    from torchvision.transforms import v2

    from webssl_repro.evaluate.imagesets import CLASSIFY_CROP, EvalImages, image_tensor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))  # fine noise: aliasing shows
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def torchvision(*steps, x=pixels):
        return (v2.Compose(list(steps))(x).clamp(0, 1) - mean) / std

    bicubic = v2.InterpolationMode.BICUBIC
    for crop, resize in ((CLASSIFY_CROP, 54), (1.0, 48)):  # int(48 / (224/256)) = 54
        ours = image_tensor(image, 48, "crop", crop)
        ref = torchvision(v2.Resize(resize, bicubic, antialias=True), v2.CenterCrop(48))
        assert ours.shape == (3, 48, 48) and torch.allclose(ours, ref, atol=1e-4), crop
    # The dense fits resize as mmcv (mmseg, the depth toolbox): OpenCV's bilinear on the 8-bit
    # image, matched within one 8-bit level (OpenCV's fixed point), not PIL's filtered bicubic.
    one_level = 1.0 / 255 / std + 1e-5
    for fit, size, hw in (("squash", (28, 42), (28, 42)), ("short", 45, (45, 75)), ("squash", (120, 200), (120, 200))):
        ours = image_tensor(image, size, fit)
        bgr = cv2.resize(np.asarray(image)[..., ::-1], hw[::-1], interpolation=cv2.INTER_LINEAR)
        ref = (torch.from_numpy(bgr[..., ::-1].astype(np.float32) / 255.0).permute(2, 0, 1) - mean) / std
        assert ours.shape == ref.shape and ((ours - ref).abs() <= one_level).all(), (fit, size)
        assert ((ours - ref).abs() > 1e-5).float().mean() < 0.25, (fit, size)  # mostly exact
        filtered = torchvision(v2.Resize(hw, bicubic, antialias=True))
        assert (ours - filtered).abs().mean() > 0.05, (fit, size)
    # pad: the image centred on a 150 x 150 square of the mean colour (30 rows above and below)
    square = torch.tensor([int(255 * m) / 255.0 for m in (0.485, 0.456, 0.406)]).view(3, 1, 1).repeat(1, 150, 150)
    square[:, 30:120] = pixels
    padded = image_tensor(image, 48, "pad")
    assert torch.allclose(padded, torchvision(v2.Resize((48, 48), bicubic, antialias=True), x=square), atol=1e-4)
    assert torch.equal(EvalImages([{"image": image, "label": 3}], 48, "label")[0][0],
                       image_tensor(image, 48, "crop", CLASSIFY_CROP))
    with pytest.raises(ValueError, match="square"):
        image_tensor(image, (28, 42))
    with pytest.raises(ValueError, match="fit"):
        image_tensor(image, 48, "stretch")


def test_ade20k_and_nyud_must_be_named_at_the_dry_run():
    """The hub's ADE20K / NYUd ship loading scripts that datasets does not run: with no copy named,
    the plan (dry run) stops naming the key, not the first classic job after pretraining."""
    from webssl_repro.config import ConfigError
    from webssl_repro.settings import merge_nested
    from webssl_repro.workflow import Plan, shipped_plan

    paper = shipped_plan("paper").config
    assert paper["data"]["evalsets"]["depth"] == {"dataset": "/datasets/nyu_depth_v2"}
    unset = merge_nested(paper, {"data": {"evalsets": {"depth": None}}})
    unset["data"]["evalsets"].pop("depth")
    with pytest.raises(ConfigError, match=r"data.evalsets.depth.dataset is not set.*sayakpaul/nyu_depth_v2 ships a "
                                          r"loading script"):
        Plan(unset)
    Plan({**unset, "stages": ["data", "pretrain", "vqa", "alignment"]})  # no classic stage: no ADE20K / NYUd
    with pytest.raises(ConfigError, match=r"data.evalsets.segmentation.dataset is not set"):
        build_hf_manifest("segmentation", {"splits": {"val": "validation"}})
