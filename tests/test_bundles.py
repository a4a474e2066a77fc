"""The MONAI Bundles: metadata per the specification, train -> inference -> TorchScript export, end to end."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from medssl.bundle_settings import config_settings
from medssl.bundles import bundle_parser, bundle_root, check_metadata, list_bundles, run_bundle

VIT_BUNDLES = ["mae_ct_3d", "mae_xray_2d", "dino_xray_2d", "simclr_xray_2d", "mae_dino_ct_3d", "box_xray_2d", "brainfuse_xray_2d",
               "brainfuse_3d"]
BUNDLES = [*VIT_BUNDLES, "medformer_multi"]  # the layout and MONAI's checks; the ViT bundles' round trip below
_3D = dict(vit_size="micro", image_size=16, patch_size=4, window_size=2, batch_size=2, cache="none")
_2D = dict(vit_size="micro", image_size=32, patch_size=8, window_size=2, batch_size=2, cache="none")
_HEADS = dict(out_dim=64)
TINY = {  # a few seconds per bundle on a laptop CPU
    "mae_ct_3d": _3D,
    "mae_xray_2d": _2D,
    "dino_xray_2d": dict(_2D, **_HEADS, n_local_crops=2),
    "simclr_xray_2d": dict(_2D, method_settings={"simclr": {"hidden_dim": 32, "out_dim": 16}}),
    "mae_dino_ct_3d": dict(_3D, **_HEADS, n_local_crops=2),
    "box_xray_2d": dict(_2D, n_query_boxes=4),
    "brainfuse_xray_2d": dict(_2D, bt_dim=32),
    "brainfuse_3d": dict(_3D, bt_dim=32),
}
DATA = {"mae_ct_3d": "ct_dicom", "mae_xray_2d": "xray", "dino_xray_2d": "xray", "simclr_xray_2d": "xray", "mae_dino_ct_3d": "ct_dicom",
        "box_xray_2d": "xray", "brainfuse_xray_2d": "xray", "brainfuse_3d": "ct_dicom"}
PICTURES = {"mae_ct_3d": ["mae"], "mae_xray_2d": ["mae"], "dino_xray_2d": ["dino"], "simclr_xray_2d": ["simclr"],
            "mae_dino_ct_3d": ["mae", "dino"], "box_xray_2d": ["box"], "brainfuse_xray_2d": ["barlow", "brainfuse"],
            "brainfuse_3d": ["barlow", "brainfuse"]}


# The required keys and types of the model zoo's metadata schema (meta_schema_20240725.json), vendored so the check
# runs offline: MONAI's verify_metadata downloads the schema unless the file is already where it looks.
_TENSOR = {"type": "object", "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range",
                                          "is_patch_data", "channel_def"],
           "properties": {"num_channels": {"type": "integer"}, "spatial_shape": {"type": "array"},
                          "value_range": {"type": "array"}, "is_patch_data": {"type": "boolean"},
                          "channel_def": {"type": "object"}}}
MODEL_ZOO_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "name", "task", "description", "authors", "copyright", "network_data_format"],
    "properties": {
        "schema": {"type": "string"}, "version": {"type": "string"}, "changelog": {"type": "object"},
        "monai_version": {"type": "string"}, "pytorch_version": {"type": "string"}, "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object"}, "name": {"type": "string"}, "task": {"type": "string"},
        "description": {"type": "string"}, "authors": {"type": "string"}, "copyright": {"type": "string"},
        "network_data_format": {"type": "object", "required": ["inputs", "outputs"],
                                "properties": {"inputs": {"type": "object", "additionalProperties": _TENSOR},
                                               "outputs": {"type": "object", "additionalProperties": _TENSOR}}},
    },
}


def test_bundles_are_found():
    assert set(BUNDLES) <= set(list_bundles())
    with pytest.raises(FileNotFoundError, match="available"):
        bundle_root("no_such_bundle")


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_layout_and_metadata(name):
    root = bundle_root(name)
    for f in ("configs/metadata.json", "configs/train.yaml", "configs/multi_gpu_train.yaml", "configs/inference.yaml",
              "configs/evaluate.yaml",
              "docs/README.md", "docs/pictures.png", "LICENSE", "large_files.yml"):
        assert (root / f).is_file(), f
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert check_metadata(meta) == []
    broken = {k: v for k, v in meta.items() if k != "authors"}
    del broken["network_data_format"]["inputs"]["image"]["dtype"]
    broken["optional_packages_version"] = {"nibabel": "5.0"}
    assert set(check_metadata(broken)) == {"missing key 'authors'", "network_data_format.inputs.image lacks 'dtype'",
                                           "optional_packages_version is deprecated (MONAI renames it over "
                                           "required_packages_version); list every package under required_packages_version"}
    assert "medssl" in meta["required_packages_version"]


@pytest.mark.parametrize("name", BUNDLES)
def test_monai_checks_pass_metadata_network_and_workflow_properties(name, tmp_path, monkeypatch, caplog):
    """What a MONAI user runs on a bundle: verify_metadata (offline), verify_net_in_out, check_properties."""
    pytest.importorskip("jsonschema")
    from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

    configs = bundle_root(name) / "configs"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(MODEL_ZOO_SCHEMA))
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(schema))  # raises on a violation
    with pytest.raises(Exception):  # the vendored schema bites: the same file without its name fails
        bad = json.loads((configs / "metadata.json").read_text())
        del bad["name"]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        verify_metadata(meta_file=str(tmp_path / "bad.json"), filepath=str(schema))
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.yaml"), n=2)  # raises on a mismatch (ViT-Tiny: 192 channels)
    monkeypatch.chdir(tmp_path)
    for config, kind in (("train", "train"), ("inference", "infer")):
        workflow = ConfigWorkflow(config_file=str(configs / f"{config}.yaml"), meta_file=str(configs / "metadata.json"),
                                  logging_file=False, workflow_type=kind)
        workflow.initialize()
        assert workflow.check_properties() == [], (config, caplog.text)


@pytest.mark.parametrize("name", VIT_BUNDLES)
def test_train_inference_and_evaluate_build_the_same_encoder_from_the_same_settings(name):
    from medssl.bundles import bundle_parser

    settings = dict(TINY[name], pixel_mean=0.5, pixel_std=0.25)
    nets = [bundle_parser(name, settings, config).get_parsed_content("network_def", lazy=False) for config in ("train", "inference")]
    nets.append(bundle_parser(name, {k: v for k, v in settings.items() if k not in ("batch_size", "cache", "out_dim", "n_local_crops",
                                                                                  "method_settings")},
                              "evaluate").get_parsed_content("network_def", lazy=False)())  # a factory there
    for net in nets:
        assert (net.pixel_mean, net.pixel_std, net.patch_size[0], net.window_size[0]) == (
            (0.5,), (0.25,), TINY[name]["patch_size"], TINY[name]["window_size"])
    assert nets[0].state_dict().keys() == nets[1].state_dict().keys()


@pytest.mark.parametrize("name", VIT_BUNDLES)
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
    ckpt_export(net_id="network_def", filepath=str(out / "encoder.ts"), ckpt_file=str(model),  # MONAI's default: scripting
                meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.yaml"), **inference)
    scripted = torch.jit.load(str(out / "encoder.ts"))
    from medssl.models import ViT, ViTFeatureMap

    eager = ViTFeatureMap(len(shape) - 2, 1, patch_size=TINY[name]["patch_size"], size="micro", window_size=2, global_every=3)
    eager.load_state_dict(torch.load(model, weights_only=True))  # strict: the bundle's model.pt is the ViT's state dict
    x = torch.rand(*shape)
    grid = TINY[name]["image_size"] // TINY[name]["patch_size"]
    assert scripted(x).shape == (1, 48) + (grid,) * (len(shape) - 2)  # channel-first feature map, as metadata.json says
    torch.testing.assert_close(scripted(x), eager.eval()(x), atol=1e-5, rtol=1e-5)
    other = torch.rand(2, 1, *[TINY[name]["image_size"] + 3 * TINY[name]["patch_size"]] * (len(shape) - 2))  # windows overhang
    torch.testing.assert_close(scripted(other), eager(other), atol=1e-5, rtol=1e-5)  # a scripted encoder runs at any size
    ckpt_export(net_id="network_def", filepath=str(out / "traced.ts"), ckpt_file=str(model), use_trace=True, input_shape=shape,
                meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.yaml"), **inference)
    torch.testing.assert_close(torch.jit.load(str(out / "traced.ts"))(x), eager(x), atol=1e-5, rtol=1e-5)  # tracing: that size
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):  # the export extra
        import onnxruntime
        from monai.bundle import onnx_export

        onnx_export(net_id="network_def", filepath=str(out / "encoder.onnx"), ckpt_file=str(model),
                    meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.yaml"), use_trace=True,
                    input_shape=shape, converter_kwargs={"dynamo": False}, **inference)
        session = onnxruntime.InferenceSession(str(out / "encoder.onnx"))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, eager(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    rng = np.random.default_rng(0)  # the bundle's evaluate config: probe and kNN on labelled data
    dims, edge = len(shape) - 2, 4 * TINY[name]["patch_size"]
    np.savez(out / "labelled.npz", train_images=rng.integers(0, 255, (16,) + (edge,) * dims, dtype=np.uint8),
             train_labels=(np.arange(16) % 2)[:, None], val_images=rng.integers(0, 255, (8,) + (edge,) * dims, dtype=np.uint8),
             val_labels=(np.arange(8) % 2)[:, None])
    evaluation = {k: v for k, v in settings.items() if k in config_settings(configs / "evaluate.yaml")[0]}
    run_bundle(name, "evaluate", dict(evaluation, ckpt_path=str(model), dataset_dir=str(out / "labelled.npz"), seeds=1,
                                      fractions=[1.0], poolings=["mean"], methods=["probe", "knn"]))
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert {r["method"] for r in results["table"]} == {"probe", "knn", "pixels"}
    tokens = ViT(len(shape) - 2, 1, patch_size=TINY[name]["patch_size"], size="micro", window_size=2, global_every=3)
    tokens.load_state_dict(torch.load(model, weights_only=True))
    torch.testing.assert_close(eager(x).flatten(2).transpose(1, 2), tokens.eval()(x)[:, 1:], atol=1e-5, rtol=1e-5)


def test_resume_continues_a_bundle_run(phantoms, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = dict(TINY["mae_ct_3d"], dataset_dir=str(phantoms / "ct_dicom"), output_dir=str(tmp_path / "run"))
    run_bundle("mae_ct_3d", "train", dict(settings, max_epochs=1))
    first = torch.load(tmp_path / "run" / "models" / "checkpoint_00000001.pt", weights_only=True)
    run_bundle("mae_ct_3d", "train", dict(settings, max_epochs=3, resume=True))
    last = torch.load(tmp_path / "run" / "models" / "checkpoint_00000003.pt", weights_only=True)
    assert first["trainer"]["iteration"] == 1 and last["trainer"]["iteration"] == 3


@pytest.mark.parametrize("name", ["mae_ct_3d", "mae_dino_ct_3d"])
def test_unetr_ready_overlay_builds_an_encoder_that_initialises_monai_unetr(name):
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNETR

    from medssl.models import monai_vit_state_dict

    configs = bundle_root(name) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "unetr_ready.yaml")])
    encoder = parser.get_parsed_content("network_def", lazy=False)
    size = parser.get_parsed_content("image_size")
    unetr = UNETR(in_channels=1, out_channels=2, img_size=size, hidden_size=encoder.embed_dim, num_heads=encoder.num_heads,
                  mlp_dim=4 * encoder.embed_dim, proj_type="conv", qkv_bias=True)
    missing, unexpected = unetr.vit.load_state_dict(monai_vit_state_dict(encoder, size, cls_token=False), strict=False)
    assert not unexpected and all("cross_attn" in k for k in missing)  # MONAI's blocks keep unused cross-attention norms
    torch.testing.assert_close(unetr.vit.blocks[11].attn.qkv.weight, encoder.blocks[11].attn.qkv.weight)
    with torch.no_grad():
        assert unetr.eval()(torch.rand(1, 1, size, size, size)).shape == (1, 2, size, size, size)
    # (UNETR's ViT has no CLS token, so its tokens differ from ours; to_monai_vit keeps it and matches exactly)
    known, _ = config_settings(configs / "train.yaml")
    assert set(ConfigParser.load_config_file(str(configs / "unetr_ready.yaml"))) <= known


def test_bundle_docs_state_the_window_the_code_uses():
    from medssl.data.intensity import CT_WINDOWS

    level, width = CT_WINDOWS["abdomen"]
    for name in BUNDLES:
        root = bundle_root(name)
        text = (root / "docs" / "README.md").read_text() + (root / "configs" / "metadata.json").read_text()
        for found in __import__("re").findall(r"level (\d+)(?: HU)?, width (\d+)", text):
            assert (float(found[0]), float(found[1])) == (level, width), (name, found)


def test_a_cyclic_mae_dino_jigsaw_box_run_through_monai_bundle_run_draws_each_task(phantoms, tmp_path):
    """The user's path: `python -m monai.bundle run` with jigsaw and query-box added through task_names; each task
    writes its own pictures, drawn from a batch that task trained on."""
    import subprocess
    import sys

    configs = bundle_root("mae_dino_ct_3d") / "configs"
    tiny = {k: v for k, v in TINY["mae_dino_ct_3d"].items()}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.yaml"),
           "--dataset_dir", str(phantoms / "ct_dicom"), "--output_dir", str(tmp_path / "run"), "--max_epochs", "4",
           "--task_names", "['mae','dino','jigsaw','box']", "--jigsaw_permutations", "10", "--n_query_boxes", "4",
           "--val_fraction", "0.5"]
    tiny["batch_size"] = 1  # two volumes, one held out: 1 step per epoch, 4 in all (mae, dino, jigsaw, box)
    for k, v in tiny.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**__import__("os").environ, "MEDSSL_SALT": "t"})
    assert out.returncode == 0, out.stderr[-3000:]
    pictures = tmp_path / "run" / "pictures"
    for task in ("mae", "dino", "jigsaw", "box"):
        assert (pictures / f"{task}_final.png").stat().st_size > 1000, sorted(p.name for p in pictures.iterdir())
    logged = out.stdout + out.stderr
    assert all(f"{t}/loss" in logged for t in ("mae", "dino", "jigsaw", "box")) and "mean_iou" in logged
    import re  # the box task scored every epoch on the held-out volume it never trained on
    assert len(re.findall(r"validation on 1 held-out images: box/val_mean_iou [0-9.e-]+  box/val_iou_above_half", logged)) == 4


def test_smart_binning_and_embedding_every_split_through_monai_bundle_run(tmp_path):
    """The user's path for #17: `python -m monai.bundle run` trains MAE on radiographs of four shapes with smart bins,
    then the inference config embeds every image into an .npz and a .csv table."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from medssl.data.scan import scan_folder, write_datalist

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(24):
        h, w = [(300, 300), (400, 200), (200, 400), (360, 240)][i % 4]
        img = (rng.random((h, w)) * 255).astype(np.uint8)
        img[:, :12] = 0  # a black border
        Image.fromarray(img).save(tmp_path / "imgs" / f"im{i:03d}.png")
    datalist = write_datalist(scan_folder(tmp_path / "imgs", progress=False, salt="t"), tmp_path / "imgs.json")
    configs = bundle_root("mae_xray_2d") / "configs"
    env = {**os.environ, "MEDSSL_SALT": "t"}
    common = ["--dataset_dir", str(datalist), "--output_dir", str(tmp_path / "run"), "--vit_size", "micro", "--image_size", "32",
              "--patch_size", "8", "--window_size", "0"]
    train = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.yaml"), *common,
                            "--binning", "smart", "--n_bins", "3", "--batch_size", "4", "--max_epochs", "1", "--cache", "none"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    logged = train.stdout + train.stderr
    assert re.search(r"binning: smart, 3 bin\(s\): ", logged), logged[-2000:]
    assert (tmp_path / "run" / "models" / "model.pt").is_file()
    emb = tmp_path / "run" / "emb.npz"
    infer = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.yaml"), *common,
                            "--ckpt_path", str(tmp_path / "run" / "models" / "model.pt"), "--embeddings_file", str(emb)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert infer.returncode == 0, infer.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(emb.with_suffix(".csv"))
    assert len(table) == 24 and table["id"].is_unique and (table["split"] == "train").all() and (table["label"] == -1).all()
    assert np.load(emb)["embeddings"].shape == (24, 48)


@pytest.mark.parametrize("name,extra,picture", [
    ("simclr_xray_2d", dict(method="byol", method_settings={"byol": {"hidden_dim": 32, "out_dim": 16, "momentum": 0.99}}), "byol"),
    ("simclr_xray_2d", dict(method="swav", method_settings={"swav": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8}}), "swav"),
    ("simclr_xray_2d", dict(method="swav", token_drop=0.5,
                            method_settings={"swav": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8}}), "swav"),
    ("mae_xray_2d", dict(method="ijepa", ijepa_targets=2), "ijepa"),
    ("mae_dino_ct_3d", dict(task_names=["mae", "ijepa"], loss_weights={"mae": 1.0, "ijepa": 1.0}), "ijepa"),
])
def test_the_remaining_ssl_families_train_through_their_bundles(name, extra, picture, phantoms, tmp_path, monkeypatch):
    """BYOL and SwAV as simclr_xray_2d methods (SwAV also with FLIP's token dropping), I-JEPA as mae_xray_2d's method
    and in mae_dino_ct_3d's cyclic mix."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    tiny = {k: v for k, v in TINY[name].items() if k != "method_settings"}
    run_bundle(name, "train", dict(tiny, **extra, dataset_dir=str(phantoms / DATA[name]), output_dir=str(out), max_epochs=2))
    assert (out / "models" / "model.pt").is_file() and (out / "pictures" / f"{picture}_final.png").stat().st_size > 1000


@pytest.mark.parametrize("settings,spread", [([], True), (["--ijepa_variance_weight", "0.0", "--ijepa_covariance_weight", "0.0",
                                                                 "--ijepa_target_norm", "layer"], False)])
def test_ijepa_settings_reach_the_task_through_monai_bundle_run(settings, spread, phantoms, tmp_path):
    """The user's path: I-JEPA's short-budget recipe (C-JEPA's spread terms, on by default) is logged when on, and a
    command-line 0 turns it off (the reference I-JEPA)."""
    import subprocess
    import sys

    configs = bundle_root("mae_xray_2d") / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.yaml"), "--method", "ijepa",
           "--dataset_dir", str(phantoms / "xray"), "--output_dir", str(tmp_path / "run"), "--max_epochs", "1", *settings]
    for k, v in TINY["mae_xray_2d"].items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = [line for line in (out.stdout + out.stderr).splitlines() if "epoch 1/1" in line]
    assert summary and "prediction_cosine" in summary[-1], summary
    assert (" variance " in summary[-1] and " covariance " in summary[-1]) == spread, summary[-1]


_MEDFORMER = ["--embed_dim", "32", "--num_heads", "2", "--depth", "1", "--num_latents", "4", "--latents_per_entry", "2",
              "--patch_size", "4"]


def test_the_medformer_bundle_trains_on_2d_and_3d_sources_then_embeds_and_evaluates_each_through_monai_bundle_run(phantoms, tmp_path):
    """The user's path for #19: `python -m monai.bundle run` trains one Medformer on the phantom radiographs (2D) and CT
    series (3D) together; inference and evaluation then take each data set with the same encoder."""
    import subprocess
    import sys

    configs = bundle_root("medformer_multi") / "configs"
    out = tmp_path / "run"
    sources = ("[{'name': 'xray', 'data': '@dataset_dir#0', 'spatial_dims': 2, 'image_size': 16, 'organ': 'abdomen', 'batch_size': 2},"
               " {'name': 'ct', 'data': '@dataset_dir#1', 'spatial_dims': 3, 'image_size': 16, 'organ': 'abdomen', 'batch_size': 2}]")
    run = lambda config, *args: subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",  # noqa: E731
                                                str(configs / f"{config}.yaml"), "--bundle_root", str(configs.parent),
                                                "--output_dir", str(out), *_MEDFORMER, *args],
                                               capture_output=True, text=True, cwd=tmp_path)
    train = run("train", "--dataset_dir", f"['{phantoms / 'xray'}', '{phantoms / 'ct_dicom'}']", "--sources", sources,
                "--task_options", "{'mae': {'mask_ratio': 0.75}, 'simclr': {'hidden_dim': 32, 'out_dim': 16}}", "--max_epochs", "2",
                "--cache", "none", "--source_rule", "proportional")  # one step per source and epoch: each task runs once
    assert train.returncode == 0, train.stderr[-3000:]
    for task in ("mae_xray", "mae_ct"):  # each source's task draws its own pictures
        assert (out / "pictures" / f"{task}_final.png").stat().st_size > 1000
    for name in ("mae_xray/loss", "simclr_xray/loss", "mae_ct/loss", "simclr_ct/loss"):  # losses logged per task and source
        assert name in train.stderr + train.stdout
    model = out / "models" / "model.pt"
    from medssl.models import Medformer

    encoder = Medformer(patch_size=4, embed_dim=32, num_heads=2, depth=1, num_latents=4, latents_per_entry=2)
    encoder.load_state_dict(torch.load(model, weights_only=True))  # strict: model.pt is the Medformer itself
    for dims, folder, size in ((2, "xray", 16), (3, "ct_dicom", 16)):
        embedded = run("inference", "--ckpt_path", str(model), "--dataset_dir", str(phantoms / folder), "--spatial_dims", str(dims),
                       "--image_size", str(size), "--embeddings_file", str(tmp_path / f"emb{dims}.npz"))
        assert embedded.returncode == 0, embedded.stderr[-3000:]
        emb = np.load(tmp_path / f"emb{dims}.npz")
        assert emb["embeddings"].shape == (2, 32) and np.isfinite(emb["embeddings"]).all()
    exported = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "mf.ts"),
                               "--ckpt_file", str(model), "--meta_file", str(configs / "metadata.json"),
                               "--config_file", str(configs / "inference.yaml"), "--bundle_root", str(configs.parent), *_MEDFORMER],
                              capture_output=True, text=True, cwd=tmp_path)  # scripted, MONAI's default
    assert exported.returncode == 0, exported.stderr[-3000:]
    scripted = torch.jit.load(str(tmp_path / "mf.ts"))
    settings = {k[2:]: int(v) for k, v in zip(_MEDFORMER[::2], _MEDFORMER[1::2])}
    feature_map = bundle_parser("medformer_multi", settings, "inference").get_parsed_content("network_def")
    feature_map.load_state_dict(torch.load(model, weights_only=True))
    for shape in ((16, 16), (24, 32), (16, 16, 16)):  # one file, 2D and 3D, any size the patch divides
        x = torch.rand(1, 1, *shape)
        torch.testing.assert_close(scripted(x), feature_map.eval()(x), atol=1e-5, rtol=1e-5)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labelled3d.npz", train_images=rng.integers(0, 255, (16, 16, 16, 16), dtype=np.uint8),
             train_labels=(np.arange(16) % 2)[:, None], val_images=rng.integers(0, 255, (8, 16, 16, 16), dtype=np.uint8),
             val_labels=(np.arange(8) % 2)[:, None])
    evaluated = run("evaluate", "--ckpt_path", str(model), "--dataset_dir", str(tmp_path / "labelled3d.npz"), "--spatial_dims", "3",
                    "--image_size", "16", "--modality", "CT", "--seeds", "1", "--fractions", "[1.0]", "--poolings", "['mean']")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert {r["method"] for r in json.loads((out / "evaluation" / "results.json").read_text())["table"]} == {"probe", "knn", "pixels"}


def test_medssl_pretrain_refuses_one_data_folder_for_a_bundle_of_many_sources(tmp_path, capsys):
    from medssl.cli import main

    assert main(["pretrain", "--bundle", "medformer_multi", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "trains on several data sets" in err and "dataset_dir=" in err and "Traceback" not in err


def test_medssl_evaluate_takes_one_data_set_of_a_medformer_run_with_set(tmp_path, capsys):
    """The `medssl` path for #19: a Medformer checkpoint evaluated on a 3D data set, told its dimensionality and modality."""
    from medssl.cli import main
    from medssl.models import Medformer

    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    torch.manual_seed(0)
    tiny = dict(embed_dim=32, num_heads=2, depth=1, num_latents=4, latents_per_entry=2, patch_size=4)
    torch.save(Medformer(**tiny).state_dict(), run / "models" / "model.pt")
    (run / "run.json").write_text(json.dumps({"bundle": "medformer_multi", "overrides": tiny}))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "lab3d.npz", train_images=rng.integers(0, 255, (16, 16, 16, 16), dtype=np.uint8),
             train_labels=(np.arange(16) % 2)[:, None], val_images=rng.integers(0, 255, (8, 16, 16, 16), dtype=np.uint8),
             val_labels=(np.arange(8) % 2)[:, None])
    args = ["-q", "evaluate", "--checkpoint", str(run / "models" / "model.pt"), "--data", str(tmp_path / "lab3d.npz"), "--out",
            str(tmp_path / "eval"), "--methods", "probe,knn", "--baselines", "", "--poolings", "mean", "--fractions", "1", "--seeds", "1"]
    assert main([*args, "--set", "spatial_dims=3", "--set", "image_size=16", "--set", "modality=CT"]) == 0
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["records"]
    assert {r["method"] for r in records} == {"probe", "knn"}
    assert main([*args, "--set", "spatial_dimz=3"]) == 2
    assert "did you mean 'spatial_dims'" in capsys.readouterr().err


def test_the_swav_queue_is_set_through_monai_bundle_run_and_saved_in_the_checkpoint(phantoms, tmp_path):
    """The user's path for SwAV's queue: a nested command-line setting reaches the task, the epoch summary logs how full
    the queue is, and the checkpoint a resumed run loads holds it."""
    import subprocess
    import sys

    from medssl.engine.checkpoint import load_checkpoint

    configs = bundle_root("simclr_xray_2d") / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.yaml"), "--method", "swav",
           "--dataset_dir", str(phantoms / "xray"), "--output_dir", str(tmp_path / "run"), "--max_epochs", "1",
           "--method_settings#swav#queue_length", "16"]
    for k, v in TINY["simclr_xray_2d"].items():
        if k != "method_settings":
            cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = [line for line in (out.stdout + out.stderr).splitlines() if "epoch 1/1" in line]
    assert summary and "queue_filled" in summary[-1], summary
    checkpoint = sorted((tmp_path / "run" / "models").glob("checkpoint_*.pt"))[-1]
    state = load_checkpoint(checkpoint)
    queues = [v for k, v in state["network"].items() if k.endswith("_extra_state") and v]
    assert len(queues) == 1 and queues[0]["queue"].shape[1] == 16 and queues[0]["queue_filled"] > 0


@pytest.mark.parametrize("method", ["simclr", "barlow", "byol", "swav"])
def test_token_drop_reaches_every_two_view_method_of_the_bundle(method):
    """`token_drop` (FLIP) is one bundle setting for all four methods of simclr_xray_2d; 0 by default."""
    tiny = {k: v for k, v in TINY["simclr_xray_2d"].items() if k != "method_settings"}
    default = bundle_parser("simclr_xray_2d", dict(tiny, method=method)).get_parsed_content("task")
    dropped = bundle_parser("simclr_xray_2d", dict(tiny, method=method, token_drop=0.5)).get_parsed_content("task")
    assert (default.token_drop, dropped.token_drop) == (0.0, 0.5)


@pytest.mark.parametrize("detail", [True, False])
def test_fuse_detail_transfer_reaches_the_task_through_monai_bundle_run(detail, phantoms, tmp_path):
    """The user's path: with detail transfer (the default) a generator below its gate leaves raw fused scans in use,
    so the fused samples' Barlow Twins term is logged from the first step; `--fuse_detail_transfer False` waits for the
    generator (the gate, 0.5, is not reached in two steps) and logs none."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    configs = bundle_root("brainfuse_xray_2d") / "configs"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.yaml"), "--dataset_dir",
           str(phantoms / "xray"), "--output_dir", str(out), "--max_epochs", "1", "--batch_size", "4"]
    cmd += [] if detail else ["--fuse_detail_transfer", "False"]  # MONAI's runner reads "false" as text: refused
    for k, v in TINY["brainfuse_xray_2d"].items():
        if k != "batch_size":
            cmd += [f"--{k}", str(v)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    events = EventAccumulator(str(next((out / "logs").glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert [s.value for s in events.Scalars("brainfuse/latent_used")] == [0.0] * len(events.Scalars("brainfuse/latent_used"))
    assert ("brainfuse/barlow" in tags) == detail, tags
