"""The MONAI Bundles: metadata per the specification, train -> inference -> TorchScript export, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.bundle_settings import config_settings
from medssl.bundles import bundle_root, check_metadata, list_bundles, run_bundle

BUNDLES = ["mae_ct_3d", "mae_xray_2d", "dino_xray_2d", "simclr_xray_2d", "mae_dino_ct_3d"]
_3D = dict(vit_size="micro", image_size=16, patch_size=4, window_size=2, batch_size=2, cache="none")
_2D = dict(vit_size="micro", image_size=32, patch_size=8, window_size=2, batch_size=2, cache="none")
_HEADS = dict(out_dim=64)
TINY = {  # a few seconds per bundle on a laptop CPU
    "mae_ct_3d": _3D,
    "mae_xray_2d": _2D,
    "dino_xray_2d": dict(_2D, **_HEADS, n_local_crops=2),
    "simclr_xray_2d": dict(_2D, method_settings={"simclr": {"hidden_dim": 32, "out_dim": 16}}),
    "mae_dino_ct_3d": dict(_3D, **_HEADS, n_local_crops=2),
}
DATA = {"mae_ct_3d": "ct_dicom", "mae_xray_2d": "xray", "dino_xray_2d": "xray", "simclr_xray_2d": "xray", "mae_dino_ct_3d": "ct_dicom"}
PICTURES = {"mae_ct_3d": ["mae"], "mae_xray_2d": ["mae"], "dino_xray_2d": ["dino"], "simclr_xray_2d": ["simclr"],
            "mae_dino_ct_3d": ["mae", "dino"]}


def test_bundles_are_found():
    assert set(BUNDLES) <= set(list_bundles())
    with pytest.raises(FileNotFoundError, match="available"):
        bundle_root("no_such_bundle")


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_layout_and_metadata(name):
    root = bundle_root(name)
    for f in ("configs/metadata.json", "configs/train.yaml", "configs/multi_gpu_train.yaml", "configs/inference.yaml",
              "docs/README.md", "LICENSE"):
        assert (root / f).is_file(), f
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert check_metadata(meta) == []
    broken = {k: v for k, v in meta.items() if k != "authors"}
    del broken["network_data_format"]["inputs"]["image"]["dtype"]
    assert set(check_metadata(broken)) == {"missing key 'authors'", "network_data_format.inputs.image lacks 'dtype'"}


@pytest.mark.parametrize("name", BUNDLES)
def test_train_and_inference_build_the_same_encoder_from_the_same_settings(name):
    from medssl.bundles import bundle_parser

    settings = dict(TINY[name], pixel_mean=0.5, pixel_std=0.25)
    nets = [bundle_parser(name, settings, config).get_parsed_content("network_def", lazy=False) for config in ("train", "inference")]
    for net in nets:
        assert (net.pixel_mean, net.pixel_std, net.patch_size[0], net.window_size[0]) == (
            (0.5,), (0.25,), TINY[name]["patch_size"], TINY[name]["window_size"])
    assert nets[0].state_dict().keys() == nets[1].state_dict().keys()


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_trains_embeds_and_exports(name, phantoms, tmp_path, monkeypatch):
    from monai.bundle import ckpt_export

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    settings = dict(TINY[name], dataset_dir=str(phantoms / DATA[name]), output_dir=str(out))
    run_bundle(name, "train", dict(settings, max_epochs=2))
    model = out / "models" / "model.pt"
    assert model.is_file() and sorted(p.name for p in (out / "models").glob("checkpoint_*.pt"))
    for task in PICTURES[name]:
        assert (out / "pictures" / f"{task}_final.png").stat().st_size > 1000
    assert list((out / "logs").glob("events.out.tfevents.*"))

    known, _ = config_settings(bundle_root(name) / "configs" / "inference.yaml")
    inference = {k: v for k, v in settings.items() if k in known}  # training-only settings are unknown there
    run_bundle(name, "inference", dict(inference, ckpt_path=str(model), embeddings_file=str(out / "emb.npz")))
    emb = np.load(out / "emb.npz")
    assert emb["embeddings"].shape == (2, 48) and np.isfinite(emb["embeddings"]).all()
    assert len(set(emb["patient"])) == 2 and all(len(p) == 16 for p in emb["patient"])  # salted hashes, not names

    configs = bundle_root(name) / "configs"
    shape = [1, 1] + [TINY[name]["image_size"]] * (3 if name.endswith("3d") else 2)
    ckpt_export(net_id="network_def", filepath=str(out / "encoder.ts"), ckpt_file=str(model),
                meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.yaml"),
                use_trace=True, input_shape=shape, **inference)
    scripted = torch.jit.load(str(out / "encoder.ts"))
    from medssl.models import ViT

    eager = ViT(len(shape) - 2, 1, patch_size=TINY[name]["patch_size"], size="micro", window_size=2, global_every=3)
    eager.load_state_dict(torch.load(model, weights_only=True))
    x = torch.rand(*shape)
    torch.testing.assert_close(scripted(x), eager.eval()(x), atol=1e-5, rtol=1e-5)


def test_resume_continues_a_bundle_run(phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = dict(TINY["mae_ct_3d"], dataset_dir=str(phantoms / "ct_dicom"), output_dir=str(tmp_path / "run"))
    run_bundle("mae_ct_3d", "train", dict(settings, max_epochs=1))
    first = torch.load(tmp_path / "run" / "models" / "checkpoint_00000001.pt", weights_only=True)
    run_bundle("mae_ct_3d", "train", dict(settings, max_epochs=3, resume=True))
    last = torch.load(tmp_path / "run" / "models" / "checkpoint_00000003.pt", weights_only=True)
    assert first["trainer"]["iteration"] == 1 and last["trainer"]["iteration"] == 3
