"""Checkpoints by `hf-hub:` name, fully offline: a Hub cache is built in tmp_path with the layout
huggingface_hub reads (models--org--name/{blobs, refs/main, snapshots/<commit>/}, each snapshot file a
link to its blob), holding a tiny timm-format ViT (model.safetensors + timm's config.json) and a tiny
HF-format ViT (config.json + model.safetensors), and HF_HUB_OFFLINE=1."""

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from helpers import make_image_folder, tiny_config, write_finetune_config
from vitkit.analysis.zoo import metafile
from vitkit.cli import main
from vitkit.convert import read_checkpoint, write_layout
from vitkit.files import CheckpointError
from vitkit.models.variants import VARIANTS
from vitkit.models.vit import VisionTransformer
from vitkit.registry import HUB_SOURCES

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40
# timm reads the number of heads from its architecture name; the width of ViT-Ti (192) gives the
# size table's 3 heads, as a timm file carries none.
TIMM_CONFIG = dict(embed_dim=192, num_heads=3, mlp_dim=64)


def tiny_model(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(tiny_config(**overrides)).eval()


def blob_name(name: str, data: bytes) -> str:
    """What huggingface_hub names a file's blob: the SHA-256 of an LFS file (weights), else the Git
    blob hash."""
    if name.endswith((".safetensors", ".bin")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(
    cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Put `files` in the cache as snapshot `commit` of `repo`, `ref` pointing at it; the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / blob_name(name, data)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def timm_files(model: VisionTransformer, tmp_path: Path) -> dict[str, bytes]:
    """model.safetensors and the config.json timm publishes beside it (`architecture`, `pretrained_cfg`)."""
    weights = write_layout(model, tmp_path / "timm-export" / "model.safetensors", "timm")
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": model.config.num_classes,
        "num_features": model.config.embed_dim,
        "global_pool": "token",
        "pretrained_cfg": {
            "tag": "augreg_in21k_ft_in1k",
            "custom_load": True,
            "input_size": [3, 32, 32],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": model.config.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    return {"model.safetensors": weights.read_bytes(), "config.json": json.dumps(config).encode()}


def hf_files(model: VisionTransformer, tmp_path: Path, classes: list[str] | None = None) -> dict[str, bytes]:
    """An HF ViTForImageClassification folder as `vitkit convert --to hf` writes it."""
    folder = write_layout(model, tmp_path / "hf-export", "hf", classes=classes)
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def logits(model: VisionTransformer) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32))


def test_timm_repo_loads_by_name_as_the_local_file(hub_cache, tmp_path, caplog):
    model = tiny_model(**TIMM_CONFIG)
    files = timm_files(model, tmp_path)
    cache_repo(hub_cache, "timm/tiny_vit.test", files)
    with caplog.at_level(logging.INFO, logger="vitkit.convert.hub"):
        checkpoint = read_checkpoint("hf-hub:timm/tiny_vit.test")
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert checkpoint.layout == "timm"
    assert checkpoint.hub.repo == "timm/tiny_vit.test"
    assert checkpoint.hub.revision == COMMIT
    assert checkpoint.hub.sha256 == {"model.safetensors": digest}
    assert COMMIT in caplog.text and digest in caplog.text and "timm/tiny_vit.test" in caplog.text
    local = vitkit.load(tmp_path / "timm-export" / "model.safetensors")
    assert torch.equal(logits(vitkit.load(checkpoint)), logits(local))
    assert torch.equal(logits(vitkit.load("hf-hub:timm/tiny_vit.test")), logits(model))


def test_timm_repo_preprocessing_is_its_pretrained_cfg(hub_cache, tmp_path):
    cache_repo(hub_cache, "timm/tiny_vit.test", timm_files(tiny_model(**TIMM_CONFIG), tmp_path))
    preprocessing = vitkit.load("hf-hub:timm/tiny_vit.test").preprocessing
    assert (preprocessing.img_size, preprocessing.eval_resize, preprocessing.crop_pct) == (
        (32, 32),
        "crop",
        0.9,
    )
    assert preprocessing.mean == preprocessing.std == (0.5, 0.5, 0.5)
    assert preprocessing.interpolation == "bicubic" and "pretrained_cfg" in preprocessing.source


def test_hf_repo_loads_by_name_as_the_local_folder(hub_cache, tmp_path):
    model = tiny_model()
    cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(model, tmp_path))
    checkpoint = read_checkpoint("hf-hub:org/tiny-hf-vit")
    assert checkpoint.layout == "hf" and checkpoint.hub.revision == COMMIT
    local = vitkit.load(tmp_path / "hf-export")
    assert torch.equal(logits(vitkit.load(checkpoint)), logits(local))
    assert checkpoint.preprocessing == read_checkpoint(tmp_path / "hf-export").preprocessing


def test_revision_names_a_snapshot(hub_cache, tmp_path):
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(first, tmp_path / "first"), COMMIT)
    cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(second, tmp_path / "second"), OTHER_COMMIT, ref="v2")
    assert torch.equal(logits(vitkit.load("hf-hub:org/tiny-hf-vit")), logits(first))
    by_commit = read_checkpoint(f"hf-hub:org/tiny-hf-vit@{OTHER_COMMIT}")
    by_tag = read_checkpoint("hf-hub:org/tiny-hf-vit@v2")
    assert by_commit.hub.revision == by_tag.hub.revision == OTHER_COMMIT
    assert by_tag.hub.requested == "v2" and by_tag.hub.name == f"hf-hub:org/tiny-hf-vit@{OTHER_COMMIT}"
    assert torch.equal(logits(vitkit.load(by_tag)), logits(second))


def test_a_repo_not_in_the_offline_cache_is_one_line(hub_cache):
    with pytest.raises(CheckpointError) as error:
        read_checkpoint("hf-hub:org/absent")
    message = str(error.value)
    assert "\n" not in message and "hf-hub:org/absent" in message
    assert "HF_HUB_OFFLINE" in message and str(hub_cache) in message


def test_a_missing_repo_is_one_line_in_the_cli(hub_cache, tmp_path, capsys):
    assert main(["convert", "hf-hub:org/absent", str(tmp_path / "out.safetensors"), "--to", "vitkit"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("vitkit convert: error: hf-hub:org/absent: HF_HUB_OFFLINE")


@pytest.mark.parametrize("name", ["hf-hub:", "hf-hub:no-slash", "hf-hub:org/name@", "hf-hub:../x/y"])
def test_a_malformed_name_is_one_line(name):
    with pytest.raises(CheckpointError, match="not a Hub name"):
        read_checkpoint(name)


def test_a_pickle_only_repo_is_refused(hub_cache, tmp_path):
    model = tiny_model()
    files = hf_files(model, tmp_path)
    weights = files.pop("model.safetensors")
    del weights  # the repo publishes the same tensors as a pickle only
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    files["pytorch_model.bin"] = (tmp_path / "pytorch_model.bin").read_bytes()
    cache_repo(hub_cache, "org/pickled", files)
    with pytest.raises(CheckpointError, match="only pytorch_model.bin; vitkit reads safetensors only"):
        read_checkpoint("hf-hub:org/pickled")


def test_a_weight_file_damaged_in_the_cache_is_refused(hub_cache, tmp_path):
    snapshot = cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(tiny_model(), tmp_path))
    blob = Path(os.path.realpath(snapshot / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged in the cache"):
        read_checkpoint("hf-hub:org/tiny-hf-vit")


def test_a_hostile_weight_file_is_refused_as_a_local_one(hub_cache, tmp_path):
    files = hf_files(tiny_model(), tmp_path)
    # Named by its own digest, as the cache names it: the header, claiming 1 TB, is what is refused.
    files["model.safetensors"] = struct.pack("<Q", 1 << 40) + b"{}" + bytes(1 << 10)
    cache_repo(hub_cache, "org/hostile", files)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint("hf-hub:org/hostile")


def test_create_model_pretrained_loads_the_hub_source(hub_cache, tmp_path, monkeypatch):
    model = tiny_model(**TIMM_CONFIG)
    cache_repo(hub_cache, "timm/tiny_vit.test", timm_files(model, tmp_path))
    monkeypatch.setitem(VARIANTS, "vit_test_tiny", model.config)
    monkeypatch.setitem(HUB_SOURCES, "vit_test_tiny", "hf-hub:timm/tiny_vit.test")
    assert torch.equal(logits(vitkit.create_model("vit_test_tiny", pretrained=True)), logits(model))
    # Other classes: a new, zero-initialised head, as vitkit.load(num_classes=...) and timm give.
    renewed = vitkit.create_model("vit_test_tiny", pretrained=True, num_classes=3)
    assert renewed.head.weight.shape == (3, 192) and not renewed.head.weight.any()
    assert torch.equal(renewed.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_create_model_pretrained_checks_the_shapes(hub_cache, tmp_path, monkeypatch):
    cache_repo(hub_cache, "timm/tiny_vit.test", timm_files(tiny_model(**TIMM_CONFIG), tmp_path))
    monkeypatch.setitem(VARIANTS, "vit_test_tiny", tiny_config(**TIMM_CONFIG, depth=3))
    monkeypatch.setitem(HUB_SOURCES, "vit_test_tiny", "hf-hub:timm/tiny_vit.test")
    with pytest.raises(CheckpointError, match="not the model vit_test_tiny describes"):
        vitkit.create_model("vit_test_tiny", pretrained=True)


def test_create_model_pretrained_without_a_source_is_one_line():
    with pytest.raises(ValueError) as error:
        vitkit.create_model("vit_small_patch16_224_hmlp", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and "vitkit zoo --metafile" in message and "hf-hub:" in message


def test_the_metafile_names_each_hub_source():
    (entry,) = metafile("vit_base_patch16_224", progress=False)["models"]
    assert entry["hub"] == "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    (entry,) = metafile("vit_small_patch16_224_hmlp", progress=False)["models"]
    assert entry["hub"] is None


def test_every_hub_source_names_a_registered_model():
    assert set(HUB_SOURCES) <= set(vitkit.list_models())
    assert all(source.startswith("hf-hub:") for source in HUB_SOURCES.values())


def test_cli_convert_reads_a_hub_name_offline(hub_cache, tmp_path):
    model = tiny_model()
    cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(model, tmp_path))
    out = tmp_path / "converted.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable,
        "-m",
        "vitkit",
        "-v",
        "convert",
        "hf-hub:org/tiny-hf-vit",
        str(out),
        "--to",
        "vitkit",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert COMMIT in result.stderr
    assert torch.equal(logits(vitkit.load(out)), logits(model))


def test_finetune_from_a_hub_name_records_its_source(hub_cache, tmp_path, capsys):
    files = hf_files(tiny_model(img_size=16, patch_size=4), tmp_path)
    cache_repo(hub_cache, "org/tiny-hf-vit", files)
    config = write_finetune_config(tmp_path / "ft.py", tmp_path / "ft", max_steps=2)
    assert main(["finetune", "hf-hub:org/tiny-hf-vit", "--config", str(config)]) == 0
    expected = {
        "repo": "org/tiny-hf-vit",
        "revision": COMMIT,
        "requested": None,
        "sha256": {"model.safetensors": hashlib.sha256(files["model.safetensors"]).hexdigest()},
    }
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["model"]["init_source"] == expected
    start = json.loads((tmp_path / "ft" / "history.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["model"]["init_source"] == expected


def test_cli_eval_of_a_hub_name_writes_outside_the_cache(hub_cache, tmp_path, monkeypatch, capsys):
    classes = [f"class{label}" for label in range(10)]
    cache_repo(hub_cache, "org/tiny-hf-vit", hf_files(tiny_model(num_classes=10), tmp_path, classes))
    make_image_folder(tmp_path / "data", train_per_class=1, test_per_class=2)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "hf-hub:org/tiny-hf-vit", "--root", str(tmp_path / "data")]) == 0
    results = json.loads((tmp_path / "eval_test" / "org--tiny-hf-vit" / "results.json").read_text())
    assert results["checkpoint"] == f"hf-hub:org/tiny-hf-vit@{COMMIT}" and results["num_samples"] == 20
    assert not list(hub_cache.rglob("results.json"))
