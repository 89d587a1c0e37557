"""vitkit predict over files, folders and patterns (text and JSON Lines, batched) and vitkit embed (.npy
and .parquet), from the command line on a tiny checkpoint with class names."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from helpers import tiny_config
from test_cli_contract import assert_one_line_error, vitkit_cli
from vitkit.cli import main
from vitkit.convert.names import CLASSES_KEY
from vitkit.data import decode_image, eval_transform
from vitkit.eval.embed import check_features_path, pooled_features, read_parquet_features

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitkit.create_model(tiny_config(num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    return vitkit.save(model, path, metadata={CLASSES_KEY: json.dumps(CLASSES)})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five PNGs of different sizes, one in a subfolder, and a text file the listing ignores."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir()
    for index, name in enumerate(["b.png", "a.png", "c.png", "d.png", "sub/e.png"]):
        pixels = rng.integers(0, 256, size=(30 + index * 7, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


EXPECTED = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_match_text_mode(checkpoint, images):
    files = [str(images / name) for name in EXPECTED]
    text = vitkit_cli("predict", str(checkpoint), *files, "--top-k", "2", "--batch-size", "2")
    assert text.returncode == 0, text.stderr
    as_json = vitkit_cli("predict", str(checkpoint), *files, "--top-k", "2", "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json_lines(as_json.stdout)
    assert [record["path"] for record in records] == files
    for line, record in zip(text.stdout.splitlines(), records, strict=True):
        assert len(record["top_k"]) == 2
        for entry in record["top_k"]:
            assert CLASSES[entry["index"]] == entry["label"]
        shown = ", ".join(f"{entry['label']} {entry['probability']:.3f}" for entry in record["top_k"])
        assert line == f"{record['path']}: {shown}"
        assert record["top_k"][0]["probability"] >= record["top_k"][1]["probability"]


def test_folder_and_glob_inputs_are_sorted_image_files(checkpoint, images):
    folder = vitkit_cli("predict", str(checkpoint), str(images), "--json", "--batch-size", "2")
    assert folder.returncode == 0, folder.stderr
    assert [record["path"] for record in json_lines(folder.stdout)] == [str(images / n) for n in EXPECTED]
    assert "image/s" in folder.stderr or "it/s" in folder.stderr  # the progress bar: 3 batches
    pattern = vitkit_cli("predict", str(checkpoint), str(images / "*.png"), "--json")
    assert [record["path"] for record in json_lines(pattern.stdout)] == [
        str(images / name) for name in EXPECTED[:4]
    ]
    assert_one_line_error(
        vitkit_cli("predict", str(checkpoint), str(images / "*.gif")), "*.gif", "no file matches"
    )


def test_broken_file_gives_an_error_object_and_the_others_are_predicted(checkpoint, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    files = [str(images / "a.png"), str(broken), str(images / "b.png")]
    result = vitkit_cli("predict", str(checkpoint), *files, "--json", "--batch-size", "2")
    assert result.returncode == 1, result.stderr
    records = json_lines(result.stdout)
    assert [record["path"] for record in records] == files
    assert "error" in records[1] and "top_k" not in records[1]
    assert "top_k" in records[0] and "top_k" in records[2]
    assert "1 of 3 files could not be read" in result.stderr


def test_embed_writes_the_pooled_features_and_the_names_in_order(checkpoint, images, tmp_path):
    out = tmp_path / "features.npy"
    result = vitkit_cli("embed", str(checkpoint), str(images), "--out", str(out), "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    names = json.loads((tmp_path / "features.json").read_text())
    assert names == [str(images / name) for name in EXPECTED]
    features = np.load(out)
    assert features.dtype == np.float32 and features.shape == (5, 32)
    model = vitkit.load(checkpoint).eval()
    transform = eval_transform(model)
    batch = torch.stack([transform(decode_image(name), None) for name in names])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    np.testing.assert_allclose(features, expected.numpy(), rtol=0, atol=1e-5)


def test_embed_refuses_an_out_suffix_it_cannot_write(checkpoint, images, tmp_path):
    result = vitkit_cli("embed", str(checkpoint), str(images), "--out", str(tmp_path / "features.csv"))
    assert_one_line_error(result, "features.csv", ".npy", ".parquet")
    assert not list(tmp_path.iterdir())


def embed(checkpoint, images, out, *extra: str):
    result = vitkit_cli(
        "embed", str(checkpoint), str(images), "--out", str(out), "--precision", "fp32", *extra
    )
    assert result.returncode == 0, result.stderr
    return result


def test_parquet_holds_the_npy_features_and_paths_in_order_with_the_model_described(
    checkpoint, images, tmp_path
):
    pytest.importorskip("pyarrow", reason="parquet output needs pyarrow: pip install 'vitkit[parquet]'")
    import pyarrow
    import pyarrow.parquet

    embed(checkpoint, images, tmp_path / "features.npy", "--batch-size", "2")
    result = embed(checkpoint, images, tmp_path / "features.parquet", "--batch-size", "2")
    assert f"wrote {tmp_path / 'features.parquet'}" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "features.json",
        "features.npy",
        "features.parquet",
    ]  # one file, no temporary left behind

    table = pyarrow.parquet.read_table(tmp_path / "features.parquet")
    assert table.column_names == ["path", "features"]
    assert table.schema.field("path").type == pyarrow.string()
    assert table.schema.field("features").type == pyarrow.list_(pyarrow.float32(), 32)
    paths = table.column("path").to_pylist()
    assert paths == [str(images / name) for name in EXPECTED]
    assert paths == json.loads((tmp_path / "features.json").read_text())
    features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    assert features.dtype == np.float32 and features.shape == (5, 32)
    np.testing.assert_array_equal(features, np.load(tmp_path / "features.npy"))

    model = vitkit.load(checkpoint).eval()
    transform = eval_transform(model)
    batch = torch.stack([transform(decode_image(path), None) for path in paths])
    with torch.no_grad():
        expected = pooled_features(model)(batch)
    np.testing.assert_allclose(features, expected.numpy(), rtol=0, atol=1e-5)

    description = json.loads(table.schema.metadata[b"vitkit"])
    assert description["checkpoint"] == str(checkpoint)
    assert description["dimension"] == 32 and description["precision"] == "fp32"
    assert description["preprocessing"] == vitkit.data.resolve_preprocessing(model).describe()
    assert description["layout"] == "vitkit"

    read_features, read_paths, read_description = read_parquet_features(tmp_path / "features.parquet")
    np.testing.assert_array_equal(read_features, features)
    assert read_paths == paths and read_description == description


def test_without_pyarrow_parquet_is_one_line_before_any_image_is_read(
    checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"pip install 'vitkit\[parquet\]'"):
        check_features_path(tmp_path / "features.parquet")
    missing = tmp_path / "no-such-images"  # never listed: the check comes first
    code = main(["embed", str(checkpoint), str(missing), "--out", str(tmp_path / "features.parquet")])
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'vitkit[parquet]'" in lines[0], lines
    assert "no-such-images" not in lines[0]
    assert check_features_path(tmp_path / "features.npy") == tmp_path / "features.npy"  # needs no pyarrow
    assert not list(tmp_path.iterdir())


def test_expand_images_lists_each_real_folder_once_and_keeps_special_files_with_their_reason(
    images, tmp_path
):
    from vitkit.eval.images import expand_images

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes((images / "a.png").read_bytes())
    os.mkfifo(folder / "b.png")
    (folder / "loop").symlink_to(folder)
    listed = expand_images([str(folder)])
    assert [(Path(item.path).name, item.reason) for item in listed] == [
        ("a.png", None),
        ("b.png", "is a FIFO, not a regular file"),
    ]
    recursive = expand_images([str(images / "**" / "*.png")])
    assert [item.path for item in recursive] == sorted(str(path) for path in images.rglob("*.png"))
