"""The released Web-SSL checkpoints (paper_facts §8.1), as plain data: the workflow checks a
config's ``pretrain.run_sources`` against them without importing torch (``models.hf`` loads them)."""
from __future__ import annotations

#: hf_id -> HF revision pinned by mteb ("" where none is recorded); native .pth at PTH_URL.
RELEASED = {
    "webssl-dino300m-full2b-224": "8529cdb3fb75014932af3b896455fc21c386168e",
    "webssl-dino1b-full2b-224": "d3bf033d9c8cc62ea9e73c40956642cad2ec568a",
    "webssl-dino2b-full2b-224": "cd5893e3fd2e988eb716792049b3dd53b3f1b68b",
    "webssl-dino3b-full2b-224": "2d015c340b16bc47bc6557fcb4e6c83a9d4aa1d3",
    "webssl-dino5b-full2b-224": "88006b18b9af369f6c611db7a64d908bde3714e0",
    "webssl-dino7b-full8b-224": "c6085463ea680043042a80c6d41db2c65e85f466",
    "webssl-dino7b-full8b-378": "53c8c5b43070bd2ddb3f66161140408ce832301f",
    "webssl-dino7b-full8b-518": "aee350d2c5e3e5fdb7ee6985291d808ea5eef431",
    "webssl-dino2b-light2b-224": "633a663f304e63cc3cbec3f7f9ca2fbc94736128",
    "webssl-dino2b-heavy2b-224": "9f46eb0c0129656a1ef195fde072e3765abdb7c6",
    "webssl-dino3b-light2b-224": "4d0160f60673805431f4ad14983e712ed88be5b8",
    "webssl-dino3b-heavy2b-224": "dd39c2910747561b332285d96c4dce0bdb240775",
    "webssl-dino300m-light2b-224": "",
    "webssl-mae300m-full2b-224": "4655a0ac1726c206ba14d5ccb26758c62a4d03b0",
    "webssl-mae700m-full2b-224": "c32be382e757d73a178de1ead62c27391d4b4280",
    "webssl-mae1b-full2b-224": "5880aefedbad8db0f44d27358f6f08e8576f70fc",
    "webssl-mae2b-full2b-224": "",
    "webssl-mae3b-full2b-224": "",
}
NO_PTH = {"webssl-dino300m-light2b-224"}  # HF collection only, no native file in the README
PTH_URL = "https://dl.fbaipublicfiles.com/webssl/{}.pth"

#: Off-the-shelf encoders of the paper's comparisons that import as eval-only runs, by the id its
#: tables use (``paper.specs.BASELINES``), evaluated at the id's resolution. Each is a tower built here:
#: - DINOv2 ViT-g is Web-DINO ViT-1B (paper §4.1: "We adapt ViT-g from Oquab et al. (2023) as
#:   ViT-1B"), trained at 518 px and evaluated at 224 / 378 / 518 (Table 14, Fig. 1, Fig. 7, Fig. 9);
#: - MAE ViT-H/14 (IN-1k, Tables 3 and 14) is Web-MAE 700M (``models.arch.MAE_ARCHS``). Its
#:   ``pytorch_url`` is MAE's encoder-only pretrained file. The HF repo holds the encoder with its
#:   pixel decoder (``ViTMAEForPreTraining``), so it was converted from one of MAE's encoder+decoder
#:   files, not from that one, and the two may differ. Its pin is the commit "add TF model" (5e0e60b),
#:   read from the hub's file listing: its pytorch_model.bin is the one of the repo's first upload;
#: - MetaCLIP ViT-H/14 (2.5B curated pairs, 12.8B seen; Table 14) is OpenAI CLIP's tower
#:   (``models.arch.OPENAI_CLIP_ARCHS``). The HF repo is a transformers ``CLIPModel``, whose vision tower
#:   is kept; its pin is the commit "Update README.md" (e2778cc, holding config.json and
#:   pytorch_model.bin), read from the hub's file listing, not checked against the repo's head. The
#:   ``pytorch_url`` is MetaCLIP's open_clip file (open_clip's ``ViT-H-14-quickgelu``, ``metaclip_fullcc``);
#: - MetaCLIP ViT-bigG/14 (v1.1, 2.5B pairs, 12.8B seen; Table 3, Fig. 7's reference line) is the same
#:   kind of tower, 1664 wide and 48 deep. It has no transformers release, so it has no ``hf_id``: it
#:   imports from a local copy of its open_clip file only (``on_the_hub``);
#: - I-JEPA ViT-H/14 (IN-22k; Tables 3 and 14) is a plain GELU ViT without a class token
#:   (``models.arch.IJEPA_ARCHS``); its CLS is the mean of its patch tokens (``evaluate.features``). Its
#:   native file holds the context encoder, its EMA target encoder and the predictor: the import takes
#:   the target encoder, which I-JEPA evaluates. The HF repo was converted from the context encoder
#:   (transformers' convert_ijepa_to_hf.py reads ``["encoder"]``), so the two sources differ. Its pin is
#:   the commit "Update README.md" (ba3c451), read from the hub's file listing;
#: - SigLIP and SigLIP 2 ViT-SO400M/14 (WebLI; Tables 3 and 14) at 224 and 384 px are shape-optimised
#:   ViTs without a class token and with a tanh-GELU MLP (``models.arch.SIGLIP_ARCHS``); their CLS is the
#:   mean of the patch tokens, as I-JEPA's, and their attention-pooling head is left out. Their HF repos are
#:   transformers ``SiglipModel`` s (SigLIP 2's fixed-resolution releases are too), of which the vision tower is
#:   kept. Their own files are big_vision ``.npz`` ones, not read here, so they have no ``pytorch_url``. Their
#:   pins are mteb's (``siglip_models.py``), not checked against the repos' heads. 384 px is not a multiple of
#:   the patch: SigLIP's valid convolution sees 27 x 27 patches and drops the last 6 px, as the tower here does.
#: id -> HF id ("" where there is no hub repo), HF revision (mteb's pin as for ``RELEASED``, or read from
#: the hub's file listing as said above; "" where none is recorded), method,
#: size label, pretraining data, evaluated and trained resolutions, native .pth.
OFF_THE_SHELF = {
    **{f"dinov2-g-{res}": {
        "hf_id": "facebook/dinov2-giant", "revision": "611a9d42f2335e0f921f1e313ad3c1b7178d206d",
        "method": "dino", "size": "1b", "data": "lvd142m", "img_size": res, "trained_size": 518,
        "pytorch_url": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth",
    } for res in (224, 378, 518)},
    "mae-h-224": {
        "hf_id": "facebook/vit-mae-huge", "revision": "5e0e60b29318a30e9ed13e27cb56d28071704980",
        "method": "mae", "size": "700m", "data": "in1k", "img_size": 224, "trained_size": 224,
        "pytorch_url": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth",
    },
    "metaclip-h-224": {
        "hf_id": "facebook/metaclip-h14-fullcc2.5b", "revision": "e2778cc22d9bfdd10213fed7a28cbb393b0c30ab",
        "method": "clip", "size": "h14", "data": "metaclip-2.5b", "img_size": 224, "trained_size": 224,
        "pytorch_url": "https://dl.fbaipublicfiles.com/MMPT/metaclip/h14_fullcc2.5b.pt",
    },
    "metaclip-g-224": {
        "hf_id": "", "revision": "",
        "method": "clip", "size": "bigG14", "data": "metaclip-2.5b", "img_size": 224, "trained_size": 224,
        "pytorch_url": "https://dl.fbaipublicfiles.com/MMPT/metaclip/G14_fullcc2.5b.pt",
    },
    "ijepa-h-224": {
        "hf_id": "facebook/ijepa_vith14_22k", "revision": "ba3c4513ca2b0f0c010f80ae2265b3dbe1083039",
        "method": "ijepa", "size": "h14", "data": "in22k", "img_size": 224, "trained_size": 224,
        "pytorch_url": "https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.h.14-900e.pth.tar",
    },
    **{f"{name}-so400m-{res}": {
        "hf_id": f"google/{name}-so400m-patch14-{res}", "revision": revision,
        "method": "siglip", "size": "so400m14", "data": "webli", "img_size": res, "trained_size": res,
        "pytorch_url": None,
    } for name, res, revision in (("siglip", 224, "d04cf29fca7b6374f74d8bea1969314492266b5e"),
                                  ("siglip", 384, "9fdffc58afc957d1a03a25b10dba0329ab15c2a3"),
                                  ("siglip2", 224, "78e403963a4f6a3640d07803284752326fdf4edf"),
                                  ("siglip2", 384, "e8e487298228002f3d8a82e0cd5c8ea9c567f57f"))},
}


def checkpoint_of(run: str) -> str | None:
    """The checkpoint a run imports: the HF id of its Web-SSL release or of an off-the-shelf encoder,
    or the native file's URL of one without a hub repo; None if neither."""
    if run in OFF_THE_SHELF:
        return str(OFF_THE_SHELF[run]["hf_id"] or OFF_THE_SHELF[run]["pytorch_url"])
    return f"facebook/webssl-{run}" if f"webssl-{run}" in RELEASED else None


def names_checkpoint(given: str, expected: str) -> bool:
    """Whether ``given`` (a config's or the command line's) names the checkpoint ``expected``
    (``checkpoint_of``): the same last path part, so an HF owner or a URL's directory may be left out."""
    return given.rsplit("/", 1)[-1] == expected.rsplit("/", 1)[-1]


def on_the_hub(run: str) -> bool:
    """Whether the checkpoint of an importable run can be downloaded from the Hugging Face hub."""
    return run not in OFF_THE_SHELF or bool(OFF_THE_SHELF[run]["hf_id"])


def directory_only(run: str) -> bool:
    """Whether an importable run reads a transformers model directory (or the hub) only, never a single
    file: the off-the-shelf encoders whose own files are in a format not read here (SigLIP's .npz)."""
    return run in OFF_THE_SHELF and OFF_THE_SHELF[run]["pytorch_url"] is None


def importable_runs() -> list[str]:
    """Every run a ``pretrain.run_sources`` entry may name."""
    return [*(name[len("webssl-"):] for name in RELEASED), *OFF_THE_SHELF]
