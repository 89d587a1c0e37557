"""vitkit train / eval / predict from the command line, on 16 synthetic images."""

import json

from PIL import Image

from test_train_loop import tiny_experiment
from vitkit.cli import main
from vitkit.data import Synthetic


def test_train_eval_predict(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_experiment(tmp_path / "run", epochs=2).to_dict()))
    assert main(["train", "--config", str(config), "--set", "train.epochs=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["steps"] == 6
        and json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 3
    )

    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "eval")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["num_samples"] == 16
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()

    image, _ = Synthetic(1, num_classes=4, split="test")[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "run"),
                str(tmp_path / "x.png"),
                str(tmp_path / "bad.png"),
                "--top-k",
                "2",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[0]
    assert line.startswith(f"{tmp_path / 'x.png'}: ") and len(line.split(", ")) == 2
    assert "bad.png: skipped" in captured.err


def test_config_errors_exit_2_with_the_key_named(tmp_path, capsys):
    assert main(["train", "--config", "digits_vit", "--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--config", "digits_vit", "--set", "train.epochs=many"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["train", "--config", "digits_vit", "--print-config", "--set", "train.epochs=2"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 2
