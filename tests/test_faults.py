"""Hostile and broken files: each case ends within seconds, under 2 GiB of address space, with one line
naming the file and the reason (exit 2), or skips the file with a report, and never a traceback.

Every case builds its input in `tmp_path` and runs in a process of its own (`fault_runner.py`, a fork
server that imports torch once), killed at a deadline. `VITKIT_FAULTS_TABLE=path.json` records each
case's outcome, wall time and peak memory (`benchmarks/faults_table.py` prints them as a table).

Covered elsewhere and not repeated here: pickle payloads across the loaders (tests/test_io.py,
tests/test_convert_errors.py), truncated files of every format (the same two), and `kill -9` at an
arbitrary moment resuming bitwise (tests/test_train_resume.py). One pickle and one truncation case
run here too, under the limits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import tiny_config
from test_train_loop import tiny_experiment
from vitkit.convert import write_layout
from vitkit.delta import save_delta
from vitkit.eval.classification import CLASSES_KEY, DATA_KEY
from vitkit.io import CONFIG_KEY, expected_shapes, read_weights, save
from vitkit.models.variants import VARIANTS
from vitkit.models.vit import VisionTransformer
from vitkit.train.metrics import read_metrics
from vitkit.train.state import (
    MARKER,
    STATE_NAME,
    Progress,
    TrainState,
    capture_rng,
    model_metadata,
    write_state,
)

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
CLASSES = ["a", "b", "c"]
DATA = {"dataset": "synthetic", "img_size": 32, "num_workers": 0, "synthetic_classes": 3}
RESULTS: list[dict] = []


class Runner:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "fault_runner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __call__(self, case: str, timeout_s: float = 30, memory_gib: float = 2, **request) -> dict:
        self.process.stdin.write(json.dumps({**request, "timeout_s": timeout_s, "memory_gib": memory_gib}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the fault runner died"
        reply = json.loads(line)
        RESULTS.append({"case": case, **reply})
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def run():
    runner = Runner()
    yield runner
    runner.close()
    table = os.environ.get("VITKIT_FAULTS_TABLE")
    if table:
        Path(table).write_text(json.dumps(RESULTS, indent=1))


def refused(reply: dict, *needles: str, rc: int = 2) -> str:
    """The case ended in time with exit `rc` and exactly one error line containing every needle."""
    assert not reply["timed_out"], f"hung until killed: {reply}"
    assert "Traceback" not in reply["stderr"], reply["stderr"]
    assert reply["rc"] == rc, reply
    errors = [line for line in reply["stderr"].splitlines() if "error: " in line]
    assert len(errors) == 1, reply["stderr"]
    for needle in needles:
        assert needle in errors[0], errors[0]
    RESULTS[-1]["outcome"] = f"exit {rc}: " + errors[0].split("error: ", 1)[1][:150]
    return errors[0]


def completed(reply: dict, rc: int = 0) -> dict | None:
    assert not reply["timed_out"], f"hung until killed: {reply}"
    assert "Traceback" not in reply["stderr"], reply["stderr"]
    assert reply["rc"] == rc, reply
    return json.loads(reply["stdout"]) if reply["stdout"].startswith("{") else None


# Inputs ------------------------------------------------------------------------------------------------
def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, num_per_class: int = 4, classes=("a", "b")) -> Path:
    for label in classes:
        for i in range(num_per_class):
            write_png(root / label / f"{i}.png", seed=i)
    return root


def tiny_model(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(tiny_config(num_classes=3, **overrides))


def write_checkpoint(path: Path, model: VisionTransformer | None = None, **metadata_fields) -> Path:
    """A training checkpoint (weights, config, classes, data config); metadata_fields replace entries."""
    model = model or tiny_model()
    metadata = model_metadata(model.config, CLASSES, DATA)
    metadata.update(metadata_fields)
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def with_config_field(name: str, value) -> str:
    return json.dumps({**tiny_config(num_classes=3).to_dict(), name: value})


@pytest.fixture
def image(tmp_path) -> Path:
    return write_png(tmp_path / "image.png")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors")


def experiment_file(path: Path, out_dir: Path, **options) -> Path:
    path.write_text(json.dumps(tiny_experiment(out_dir, epochs=1, **options).to_dict()))
    return path


# Special files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_bad", ["skip", "error"])
def test_fifo_in_an_image_folder_is_named(run, tmp_path, on_bad):
    root = image_folder(tmp_path / "train")
    os.mkfifo(root / "a" / "x.png")
    reply = run(f"FIFO in an image folder, listing (on_bad={on_bad})", probe="imagefolder",
                args=[str(root), on_bad, "full"])  # fmt: skip
    if on_bad == "error":
        refused(reply, "x.png", "FIFO")
        return
    result = completed(reply)
    assert result["num_samples"] == 8
    assert [(Path(path).name, "FIFO" in reason) for path, reason in result["bad_files"]] == [("x.png", True)]
    RESULTS[-1]["outcome"] = "skipped x.png (a FIFO), 8 samples, listed in bad_files"


@pytest.mark.parametrize("on_bad", ["skip", "error"])
def test_fifo_in_training_data(run, tmp_path, on_bad):
    image_folder(tmp_path / "data" / "train")
    image_folder(tmp_path / "data" / "test", num_per_class=2)
    os.mkfifo(tmp_path / "data" / "train" / "a" / "x.png")
    data = {"dataset": "imagefolder", "root": str(tmp_path / "data"), "verify": "header", "on_bad": on_bad}
    config = experiment_file(tmp_path / "config.json", tmp_path / "run", data=data)
    reply = run(f"FIFO in training data (vitkit train, on_bad={on_bad})", timeout_s=60,
                argv=["train", "--config", str(config)])  # fmt: skip
    if on_bad == "error":
        refused(reply, "vitkit train: error:", "x.png", "FIFO")
        return
    completed(reply)
    assert "x.png" in reply["stderr"] and "skipped 1 bad file" in reply["stderr"]
    RESULTS[-1]["outcome"] = "exit 0: trained on 8 images; x.png (a FIFO) skipped with a warning"


def test_fifo_given_to_predict(run, tmp_path, checkpoint, image):
    os.mkfifo(tmp_path / "fifo.png")
    reply = run(
        "FIFO image given to vitkit predict",
        argv=["predict", str(checkpoint), str(tmp_path / "fifo.png"), str(image)],
    )
    completed(reply, rc=1)
    assert "fifo.png: skipped: is a FIFO" in reply["stderr"]
    assert reply["stdout"].startswith(f"{image}: ")
    RESULTS[-1]["outcome"] = "exit 1: fifo.png skipped (is a FIFO), image.png predicted"


def test_fifo_given_to_plot(run, tmp_path, checkpoint):
    os.mkfifo(tmp_path / "fifo.png")
    reply = run(
        "FIFO image given to vitkit plot attention",
        argv=[
            "plot",
            "attention",
            str(checkpoint),
            str(tmp_path / "fifo.png"),
            "--out",
            str(tmp_path / "a.png"),
        ],
    )
    refused(reply, "fifo.png", "is a FIFO")
    assert not (tmp_path / "a.png").exists()


def test_fifo_given_as_checkpoint(run, tmp_path, image):
    os.mkfifo(tmp_path / "fifo.safetensors")
    reply = run(
        "FIFO checkpoint given to vitkit predict",
        argv=["predict", str(tmp_path / "fifo.safetensors"), str(image)],
    )
    refused(reply, "fifo.safetensors", "FIFO")


def test_fifo_config_json_in_a_folder(run, tmp_path):
    folder = save(tiny_model(), tmp_path / "folder")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    refused(
        run("FIFO config.json in a checkpoint folder", probe="load", args=[str(folder)]),
        "config.json",
        "FIFO",
    )


# Symlink loops -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_loops", [1, 2])
def test_symlink_loops_list_each_file_once(run, tmp_path, num_loops):
    root = image_folder(tmp_path / "train")
    (root / "a" / "loop").symlink_to(".")
    if num_loops == 2:
        (root / "a" / "sub").mkdir()
        (root / "a" / "sub" / "up").symlink_to("../..")
        (root / "b" / "other").symlink_to("../a")
    reply = run(
        f"symlink loop x{num_loops} in a class folder", timeout_s=20, probe="imagefolder", args=[str(root)]
    )
    result = completed(reply)
    assert result["num_samples"] == 8
    assert reply["wall_s"] < 5
    RESULTS[-1]["outcome"] = "8 samples from 8 files (each real folder listed once)"


def test_folder_tree_deeper_than_the_recursion_limit(run, tmp_path):
    root = image_folder(tmp_path / "train")
    png = (root / "a" / "0.png").read_bytes()
    fd = os.open(root / "a", os.O_RDONLY)
    for _ in range(1200):  # each level by a descriptor: the path is never spelled out
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, png)
    os.close(out)
    os.close(fd)
    try:
        reply = run("image folder 1,200 folders deep", probe="imagefolder", args=[str(root), "skip", "full"])
        assert completed(reply)["num_samples"] == 9
        RESULTS[-1]["outcome"] = "9 samples, the deepest file included"
    finally:
        remove_deep(root / "a" / "d")


def remove_deep(top: Path) -> None:
    """Delete a chain of nested folders `top/d/d/...` one level at a time (shutil.rmtree, which pytest
    uses to clean up, recurses past Python's limit on it)."""
    spare = top.with_name(top.name + ".next")
    while (top / "d").exists():
        os.rename(top / "d", spare)
        for leftover in top.iterdir():
            leftover.unlink()
        top.rmdir()
        os.rename(spare, top)
    shutil.rmtree(top)


# Configs from metadata ------------------------------------------------------------------------------------
ABSURD = [
    ("depth", 0), ("depth", -1), ("depth", 10**9), ("depth", "12"), ("depth", 2.5), ("depth", True),
    ("embed_dim", 0), ("embed_dim", -32), ("embed_dim", 10**7), ("embed_dim", "32"),
    ("num_heads", 0), ("num_heads", -4), ("num_heads", 10**6),
    ("patch_size", 0), ("patch_size", -8), ("patch_size", 10**6), ("patch_size", 8.0),
    ("img_size", 0), ("img_size", -32), ("img_size", 100000), ("img_size", [32, 32, 32]), ("img_size", "32"),
    ("num_classes", -1), ("num_classes", 10**9), ("num_classes", "3"), ("num_classes", None),
    ("mlp_dim", 10**9), ("norm_eps", -1.0),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), ABSURD, ids=[f"{f}={v!r}"[:24] for f, v in ABSURD])
def test_absurd_metadata_config_is_refused_before_building(run, tmp_path, image, field, value):
    path = write_checkpoint(tmp_path / "model.safetensors", **{CONFIG_KEY: with_config_field(field, value)})
    reply = run(f"metadata config {field}={value!r}", timeout_s=15, argv=["predict", str(path), str(image)])
    refused(reply, "model.safetensors", field)


def test_metadata_config_that_is_not_an_object(run, tmp_path, image):
    path = write_checkpoint(tmp_path / "model.safetensors", **{CONFIG_KEY: "[1, 2]"})
    refused(run("metadata config is a JSON list", argv=["predict", str(path), str(image)]),
            "model.safetensors", "vitkit.config")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "needle"),
    [({"depth": 3}, "parameters"), ({"embed_dim": 64, "mlp_dim": 128}, "shapes differ")],
    ids=["depth", "width"],
)
def test_config_that_disagrees_with_the_tensors(run, tmp_path, image, change, needle):
    config = json.dumps({**tiny_config(num_classes=3).to_dict(), **change})
    path = write_checkpoint(tmp_path / "model.safetensors", **{CONFIG_KEY: config})
    reply = run(
        f"metadata config {change} vs tensors of depth 2, width 32", argv=["predict", str(path), str(image)]
    )
    refused(reply, "model.safetensors", needle)


def test_largest_config_within_bounds_is_checked_without_building_it(run, tmp_path, image):
    # 512 blocks of 16 parallel branches at width 16384: building it even on the meta device takes
    # over a minute, so the header check must not build a module per claimed block.
    largest = {"depth": 512, "parallel": 16, "embed_dim": 16384, "num_heads": 16, "mlp_dim": 65536}
    config = json.dumps({**tiny_config(num_classes=3).to_dict(), **largest})
    path = write_checkpoint(tmp_path / "model.safetensors", **{CONFIG_KEY: config})
    reply = run("metadata config: depth 512 x 16 branches, width 16384", timeout_s=15,
                argv=["predict", str(path), str(image)])  # fmt: skip
    refused(reply, "model.safetensors", "shapes differ")
    assert reply["wall_s"] < 10


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch4_32", "vit_base_patch16_12x2_224", "vit_base_r50_s16_224", "vit_small_patch16_224_hmlp",
             "vit_huge_patch14_224_in21k"],
)  # fmt: skip
def test_expected_shapes_equal_the_built_model(name):
    config = VARIANTS[name]
    with torch.device("meta"):
        built = {key: tuple(value.shape) for key, value in VisionTransformer(config).state_dict().items()}
    assert list(expected_shapes(config).items()) == list(built.items())


@pytest.mark.parametrize(
    ("field", "value"),
    [("img_size", 100000), ("img_size", 2048), ("num_workers", 10**6), ("batch_size", 0), ("mean", "abc")],
)
def test_absurd_data_config_in_metadata(run, tmp_path, image, field, value):
    path = write_checkpoint(tmp_path / "model.safetensors", **{DATA_KEY: json.dumps({**DATA, field: value})})
    reply = run(f"metadata data config {field}={value!r}", argv=["predict", str(path), str(image)])
    refused(reply, "model.safetensors", "built for (32, 32)" if value == 2048 else f"DataConfig.{field}")


# Lying array headers ---------------------------------------------------------------------------------------
def test_npz_header_claiming_a_terabyte(run, tmp_path):
    path = tmp_path / "lying.npz"
    member = tmp_path / "w.npy"
    with open(member, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
        )
        handle.write(b"\0" * 16)
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "w.npy")
    refused(
        run(".npz member header claims 10**12 floats", probe="load", args=[str(path)]),
        "lying.npz",
        "claims shape",
    )
    reply = run(
        ".npz claiming 10**12 floats, vitkit convert",
        argv=["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "vitkit"],
    )
    refused(reply, "lying.npz", "(1000000000000,)")


def test_npy_named_npz(run, tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(4, dtype=np.float32))
    refused(run(".npy file named .npz", probe="load", args=[str(path)]), "array.npz", "single .npy array")


def test_npz_with_object_array(run, tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, good=np.zeros(3), bad=np.array([{"a": 1}], dtype=object))
    refused(run(".npz with an object array", probe="load", args=[str(path)]), "objects.npz", "object arrays")


# Malformed JSON in every file vitkit reads -------------------------------------------------------------------
@pytest.mark.parametrize("key", [CONFIG_KEY, CLASSES_KEY, DATA_KEY])
def test_malformed_metadata_json(run, tmp_path, image, key):
    path = write_checkpoint(tmp_path / "model.safetensors", **{key: "{bad"})
    refused(run(f"malformed JSON in metadata {key}", argv=["predict", str(path), str(image)]),
            "model.safetensors", key, "invalid JSON")  # fmt: skip


def test_class_names_that_do_not_fit_the_head(run, tmp_path, image):
    path = write_checkpoint(tmp_path / "model.safetensors", **{CLASSES_KEY: json.dumps(["a"])})
    refused(run("metadata: 1 class name for 3 outputs", argv=["predict", str(path), str(image)]),
            "model.safetensors", CLASSES_KEY)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "needle"),
    [("{bad", "invalid JSON"), ("[]", "expected a JSON object"), ("{}", "num_attention_heads")],
)
def test_broken_hf_config_json(run, tmp_path, text, needle):
    folder = write_layout(tiny_model(), tmp_path / "hf", to="hf")
    (folder / "config.json").write_text(text)
    refused(run(f"HF config.json {text!r}", probe="load", args=[str(folder)]), "config.json", needle)


def test_broken_hf_shard_index(run, tmp_path):
    folder = write_layout(tiny_model(), tmp_path / "hf", to="hf")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../../etc/passwd"}})
    )
    reply = run("HF shard index naming a file outside the folder", probe="load", args=[str(folder)])
    refused(reply, "model.safetensors.index.json", "weight_map")


@pytest.mark.parametrize(
    ("text", "needle"), [("{bad", "invalid JSON"), ('{"classes": 3}', "not a shard index")]
)
def test_broken_shard_index(run, tmp_path, text, needle):
    (tmp_path / "dataset.json").write_text(text)
    refused(
        run(f"shards dataset.json {text!r}", probe="shards", args=[str(tmp_path)]), "dataset.json", needle
    )


def test_metrics_line_cut_by_a_kill_is_dropped_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki')
    assert read_metrics(path) == [{"step": 1, "kind": "train"}]
    path.write_text('{"step": 1}\n{bad}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(path)


def training_checkpoint(root: Path) -> Path:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model.state_dict(), optimizer.state_dict(), Progress(step=3), [capture_rng()])
    return write_state(root, state, model_metadata(model.config))


def rewrite_state(folder: Path, text: str) -> None:
    """Replace state.json and update the marker's checksum, as a hostile writer would."""
    import hashlib

    (folder / STATE_NAME).write_text(text)
    marker = json.loads((folder / MARKER).read_text())
    marker["sha256"][STATE_NAME] = hashlib.sha256(text.encode()).hexdigest()
    (folder / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(("change", "needle"), [("malformed", "invalid JSON"), ("no rng", "'rng'")])
def test_broken_state_json(run, tmp_path, change, needle):
    folder = training_checkpoint(tmp_path / "checkpoints")
    state = json.loads((folder / STATE_NAME).read_text())
    del state["rng"]
    rewrite_state(folder, "{bad" if change == "malformed" else json.dumps(state))
    refused(run(f"state.json {change}", probe="read_state", args=[str(folder)]), "state.json", needle)


def test_checkpoint_marker_that_is_a_fifo(run, tmp_path):
    folder = training_checkpoint(tmp_path / "checkpoints")
    (folder / MARKER).unlink()
    os.mkfifo(folder / MARKER)
    refused(run("COMPLETE marker is a FIFO", probe="read_state", args=[str(folder)]), "COMPLETE", "FIFO")


def test_malformed_run_config_json(run, tmp_path):
    path = tmp_path / "run" / "config.json"
    path.parent.mkdir()
    path.write_text('{"model": {')
    refused(run("malformed run config.json (vitkit train)", argv=["train", "--config", str(path)]),
            "config.json", "invalid JSON")  # fmt: skip


# Silent acceptance ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_all_nan_checkpoint_is_refused(run, tmp_path, image, command):
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    path = write_checkpoint(tmp_path / "nan.safetensors", model)
    argv = (
        ["predict", str(path), str(image)]
        if command == "predict"
        else ["eval", str(path), "--out", str(tmp_path)]
    )
    refused(
        run(f"all-NaN checkpoint (vitkit {command})", argv=argv), "nan.safetensors", "non-finite", "cls_token"
    )


def test_class_with_no_valid_image(run, tmp_path):
    root = image_folder(tmp_path / "train", classes=("a",))
    (root / "b").mkdir()
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("not an image")
    reply = run(
        "class whose every file fails verification", probe="imagefolder", args=[str(root), "skip", "full"]
    )
    refused(reply, str(root / "b"), "no valid image")


def test_top_k_without_top_1_fails_before_training(run, tmp_path):
    config = experiment_file(tmp_path / "config.json", tmp_path / "run")
    reply = run(
        "eval.top_k=[100] (vitkit train)",
        argv=["train", "--config", str(config), "--set", "eval.top_k=[100]"],
    )
    refused(reply, "eval.top_k=[100]")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_image_met_during_training_with_on_bad_error(run, tmp_path, num_workers):
    image_folder(tmp_path / "data" / "train")
    image_folder(tmp_path / "data" / "test", num_per_class=2)
    (tmp_path / "data" / "train" / "a" / "text.jpg").write_text("not an image")
    data = {
        "dataset": "imagefolder",
        "root": str(tmp_path / "data"),
        "on_bad": "error",
        "num_workers": num_workers,
    }
    config = experiment_file(tmp_path / "config.json", tmp_path / "run", data=data)
    reply = run(f"bad image met in training, on_bad=error, {num_workers} workers", timeout_s=60,
                argv=["train", "--config", str(config)])  # fmt: skip
    refused(reply, "vitkit train: error: bad image", "text.jpg")


# Wrong-shape loads on every path -------------------------------------------------------------------------------
def test_load_with_another_depth(run, checkpoint):
    refused(run("vitkit.load(depth=3) of a depth-2 checkpoint", probe="load", args=[str(checkpoint)],
                kwargs={"depth": 3}), "model.safetensors", "blocks.2")  # fmt: skip


def test_init_from_another_width(run, tmp_path, checkpoint):
    config = experiment_file(tmp_path / "config.json", tmp_path / "run")
    argv = ["train", "--config", str(config), "--set", f"model.init_from={checkpoint}",
            "--set", "model.overrides.embed_dim=64", "--set", "model.overrides.mlp_dim=128"]  # fmt: skip
    refused(
        run("init_from a width-32 checkpoint into width 64", argv=argv), "model.safetensors", "(32,", "(64,"
    )


def test_finetune_from_a_checkpoint_whose_config_lies(run, tmp_path):
    from helpers import write_finetune_config

    config = json.dumps({**tiny_config(num_classes=3).to_dict(), "depth": 3})
    path = write_checkpoint(tmp_path / "model.safetensors", **{CONFIG_KEY: config})
    finetune = write_finetune_config(tmp_path / "finetune.py", tmp_path / "run", max_steps=1)
    reply = run(
        "finetune from a checkpoint of depth 2 that claims 3",
        argv=["finetune", str(path), "--config", str(finetune)],
    )
    refused(reply, "model.safetensors", "parameters")


def test_delta_with_a_wrong_shape(run, tmp_path, checkpoint):
    task = tiny_model()
    with torch.no_grad():
        task.blocks[0].attn.qkv.weight.add_(1)
    delta = save_delta(task, checkpoint, tmp_path / "delta.safetensors")
    tensors, metadata = read_weights(delta)
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(97, 32)
    save_file(tensors, str(delta), metadata=metadata)
    reply = run("delta tensor of another shape", probe="load_delta", args=[str(checkpoint), str(delta)])
    refused(reply, "delta.safetensors", "blocks.0.attn.qkv.weight", "(97, 32)")


def test_delta_whose_config_claims_a_huge_model(run, tmp_path, checkpoint):
    task = tiny_model()
    with torch.no_grad():
        task.blocks[0].attn.qkv.weight.add_(1)
    delta = save_delta(task, checkpoint, tmp_path / "delta.safetensors")
    tensors, metadata = read_weights(delta)
    metadata[CONFIG_KEY] = json.dumps({**tiny_config(num_classes=3).to_dict(), "mlp_dim": 65536})
    save_file(tensors, str(delta), metadata=metadata)
    reply = run("delta config claims mlp_dim 65536", probe="load_delta", args=[str(checkpoint), str(delta)])
    refused(reply, "delta.safetensors", "blocks.0.mlp.fc1.weight: base (64, 32) vs task config (65536, 32)")


# The existing cases, under the limits ---------------------------------------------------------------------------
class _Hostile:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused(run, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Hostile(str(marker))}, path)
    refused(
        run("pickle payload in a .pth (vitkit.load)", probe="load", args=[str(path)]),
        "evil.pth",
        "refused to unpickle",
    )
    assert not marker.exists()


def test_pth_zip_directory_claiming_gigabytes(run, tmp_path):
    path = tmp_path / "lying.pth"
    torch.save({"weight": torch.zeros(4)}, path)
    raw = bytearray(path.read_bytes())
    # The central-directory entry of the tensor's storage (name at offset 46, its length at 28): its
    # uncompressed size is at offset 24.
    entry = raw.index(b"PK\x01\x02")
    while not raw[entry + 46 : entry + 46 + int.from_bytes(raw[entry + 28 : entry + 30], "little")].endswith(
        b"data/0"
    ):
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 24 : entry + 28] = (4 * 10**9).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    refused(run(".pth zip directory claims 4 GB for a 16-byte tensor", probe="load", args=[str(path)]),
            "lying.pth", "claims 4000000000 bytes")  # fmt: skip


def test_truncated_checkpoint(run, tmp_path, checkpoint, image):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(checkpoint.read_bytes()[:3000])
    refused(run("truncated safetensors (vitkit predict)", argv=["predict", str(path), str(image)]),
            "truncated.safetensors", "truncated")  # fmt: skip
