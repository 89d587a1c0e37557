"""Commands that train: train, demo, and the papers' finetune and pretrain."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .common import add_set_arg


# vitkit train -------------------------------------------------------------------------------------
def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="a name in configs/ (e.g. digits_vit), a .py file, or a run's config.json",
    )
    add_set_arg(
        parser,
        "override a config field, type-checked: optim.lr=1e-3, train.epochs=5, model.overrides.depth=6",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_train(args: argparse.Namespace) -> int:
    """Train an experiment from configs/ (resumes from its run folder); torchrun runs it on N processes."""
    from ..train import load_experiment, train

    return run_experiment(args, load_experiment, train)


def run_experiment(args: argparse.Namespace, load, run) -> int:
    """Load the experiment of `--config` with `--set`, print it (`--print-config`) or run it: the
    summary printed by the main process, a non-finite loss reported in one line (exit 3)."""
    import json

    from ..train import NonFiniteLossError

    experiment = load(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(experiment.to_dict(), indent=1))
        return 0
    try:
        summary = run(experiment)
    except NonFiniteLossError as error:
        print(f"vitkit {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    if "train_time_s" in summary:  # the main process
        print(json.dumps(summary, indent=1))
    return 0


# vitkit demo --------------------------------------------------------------------------------------
def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder of the demo")
    add_set_arg(parser, "override the digits_vit config, e.g. train.epochs=5")


def command_name() -> str:
    """How to call this vitkit again from the user's shell: `vitkit` when it is on the PATH, else
    the path of the entry point beside this Python (e.g. .venv/bin/vitkit), else `python -m vitkit`."""
    entry = Path(sys.executable).parent / "vitkit"
    on_path = shutil.which("vitkit")
    if on_path and entry.exists() and Path(on_path).resolve() == entry.resolve():
        return "vitkit"
    if entry.exists():
        try:
            return str(entry.relative_to(Path.cwd()))
        except ValueError:
            return str(entry)
    return f"{sys.executable} -m vitkit"


def write_digit_samples(folder: Path, num_samples: int = 4) -> list[Path]:
    """A few test-split digits as PNG files (8x8, as in the data set), to try `vitkit predict` on."""
    from PIL import Image

    from ..data import Digits

    test = Digits("test")
    paths = []
    for index in range(num_samples):
        image, label = test[index]
        path = folder / f"test{index:03d}_label{label}.png"
        pixels = image.permute(1, 2, 0).numpy()
        atomic_write_image(path, Image.fromarray(pixels))
        paths.append(path)
    return paths


def atomic_write_image(path: Path, image) -> None:
    from ..io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def run_demo(args: argparse.Namespace) -> int:
    """The main job: train a small ViT on the embedded digits, evaluate it, write results and figures."""
    from ..train import load_experiment, train

    started = time.perf_counter()
    experiment = load_experiment("digits_vit", [f"train.out_dir={args.out}", *args.overrides])
    print(
        f"vitkit demo: training {experiment.model.name} with {experiment.model.overrides} on the embedded "
        f"digits (scikit-learn, 8x8 upsampled to {experiment.data.img_size} px) for {experiment.train.epochs} epochs",
        file=sys.stderr,
    )
    summary = train(experiment)
    out = Path(summary["out_dir"])
    samples = write_digit_samples(out / "samples")
    print(
        f"\nvitkit demo: test top-1 {summary['top1']:.2%} (top-5 {summary['top5']:.2%}, best {summary['best_top1']:.2%}) "
        f"after {summary['steps']} steps; {summary['train_time_s']:.0f} s training, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    for what, key in (
        ("results (JSON)", "results"),
        ("loss/accuracy curves (PNG)", "curves"),
        ("confusion matrix (PNG)", "confusion_matrix"),
        ("best weights", "best"),
        ("last weights", "last"),
        ("metrics (JSONL; CSV beside it)", "metrics"),
    ):
        print(f"  {what:32s} {summary[key]}")
    print(f"  {'resolved config':32s} {out / 'config.json'}")
    print(f"  {'resumable checkpoints':32s} {out / 'checkpoints'}")
    print(f"  {'TensorBoard logs':32s} {out / 'tensorboard'}")
    print(f"  {'test digits to predict (PNG)':32s} {out / 'samples'}")
    vitkit = command_name()
    print(f"next: {vitkit} eval {out}   |   {vitkit} predict {out} {samples[0]}")
    return 0


# vitkit finetune ----------------------------------------------------------------------------------
def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="pre-trained weights: any file or folder vitkit.load reads")
    parser.add_argument(
        "--root",
        default=None,
        help="an image folder (ROOT/train/<class>/..., ROOT/test/<class>/...): data.dataset=imagefolder, data.root=ROOT",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a fine-tuning experiment in configs/, used as written (default: finetune, with --recipe auto)",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        choices=["auto", "config"],
        help="auto: optimiser, lr, schedule, epochs, batch, layer decay, crops and label smoothing chosen from the "
        "number of training images and the checkpoint (vitkit.train.finetune_recipe), the head fitted as a "
        "linear probe first (LP-FT); config: the config's fields as written (default: auto without --config, "
        "config with it)",
    )
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="fine-tuning resolution (default: the recipe's or config's)",
    )
    parser.add_argument(
        "--freeze",
        default=None,
        choices=["none", "attention-only", "head-only", "lora"],
        help="freezing rule; lora: low-rank adapters on the attention weights, merged into them when the run "
        "writes its weights; every rule but none also writes delta.safetensors (default: the config's)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="the rank of --freeze lora's adapters: model.lora_rank (default: the config's, 8)",
    )
    parser.add_argument(
        "--head",
        default=None,
        choices=["probe", "zero"],
        help="the new head's start: probe (a logistic regression on the frozen features, LP-FT) or zero "
        "(the ViT paper's) (default: probe with --recipe auto, zero with --recipe config)",
    )
    add_set_arg(
        parser,
        "override a config field, each recipe field included: optim.lr=1e-4 (the lr as applied at the "
        "actual batch, never scaled: optim.lr_base_batch=512 asks for scaling), train.epochs=5, data.batch_size=16",
    )
    flags = {
        "--compare-freezing": "first print trainable parameters, memory and step time of full vs the "
        "--freeze rule (attention-only when none)",
        "--print-config": "print the resolved config (the recipe and the checkpoint's preprocessing applied) and exit",
    }
    for flag, help_text in flags.items():
        parser.add_argument(flag, action="store_true", help=help_text)


def start_digest(checkpoint: str, num_classes: int, img_size: int, head_init: str = "zero") -> str:
    """A short digest of a fine-tuning start: the source file or folder (path, size, mtime) and the
    new head (classes, how it starts) and resolution."""
    import hashlib

    path = Path(checkpoint).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    head = "" if head_init == "zero" else f"|{head_init}"
    text = f"{path}|{num_classes}|{img_size}{head}|" + "|".join(
        f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files if file.is_file()
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def finetune_overrides(args: argparse.Namespace) -> list[str]:
    """--root as its two data fields and --lora-rank as its model field, then --set; an lr given
    without optim.lr_base_batch is the lr as applied (a config's batch scaling is turned off for it)."""
    from ..train.finetune_recipe import given_keys

    overrides = [
        *(["data.dataset=imagefolder", f"data.root={args.root}"] if args.root else []),
        *([f"model.lora_rank={args.lora_rank}"] if args.lora_rank is not None else []),
        *args.overrides,
    ]
    given = given_keys(overrides)
    if "optim.lr" in given and "optim.lr_base_batch" not in given:
        overrides.append("optim.lr_base_batch=0")
    return overrides


def resolve_finetune(args: argparse.Namespace, base, overrides: list[str]) -> tuple:
    """The experiment of a fine-tuning run, the recipe that filled it (None: the config as written) and
    the training set it was chosen for (None when not opened):
    the config with --set, the checkpoint's preprocessing, then (--recipe auto) the recipe's fields
    for this data and checkpoint, a field named by --set keeping its value."""
    import dataclasses

    from ..data import preprocessing_of
    from ..data.loader import open_dataset
    from ..train import load_experiment
    from ..train.experiment import environment_overrides
    from ..train.finetune_recipe import WARMUP_FRACTION, apply_fields, choose_finetune_recipe, given_keys

    experiment = load_experiment(args.config or "finetune", overrides)
    given = given_keys([*overrides, *environment_overrides()])
    data = experiment.data.replace(**checkpoint_preprocessing(base, sorted(given)))
    experiment = dataclasses.replace(experiment, data=data)
    if (args.recipe or ("config" if args.config else "auto")) == "config":
        return experiment, None, None
    try:
        dataset = open_dataset(data, "train")
    except (FileNotFoundError, ValueError) as error:
        if not args.print_config:
            raise
        print(f"recipe: not chosen, the training data cannot be read ({error})", file=sys.stderr)
        return experiment, None, None
    num_classes = len(getattr(dataset, "dataset", dataset).classes)
    recipe = choose_finetune_recipe(
        len(dataset), num_classes, base.config.depth, preprocessing_of(base).img_size[0]
    )
    if args.img_size is not None:
        given.add("data.img_size")
    experiment = apply_fields(experiment, recipe.fields, skip=given)
    if "train.epochs" in given and "optim.warmup_epochs" not in given:  # the warm-up follows the epochs set
        warmup = round(WARMUP_FRACTION * experiment.train.epochs, 3)
        experiment = dataclasses.replace(
            experiment, optim=dataclasses.replace(experiment.optim, warmup_epochs=warmup)
        )
    if "optim.lr" not in given:
        batch = experiment.data.batch_size * experiment.train.accumulation
        note = f"the recipe's lr at batch {batch}, not scaled from another batch"
    else:
        note = experiment.optim.lr_note or "as given by --set optim.lr, not scaled"
    experiment = dataclasses.replace(experiment, optim=dataclasses.replace(experiment.optim, lr_note=note))
    return experiment, recipe, dataset


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pre-trained checkpoint: new head (a probe fitted on the frozen features, or zero),
    2D-interpolated positions, and a recipe chosen from the data and the checkpoint."""
    import dataclasses
    import json

    from ..data.loader import open_dataset
    from ..delta import finetune_model
    from ..io import atomic_write, load, read_checkpoint, save
    from ..train import train
    from ..train.lora import merge_lora
    from ..train.optim import apply_freeze_rule

    read = read_checkpoint(args.checkpoint)  # every file opened once, here; hf-hub: names resolved
    checkpoint = str(read.path)
    base = load(read)
    experiment, recipe, dataset = resolve_finetune(args, base, finetune_overrides(args))
    if args.img_size is not None:
        experiment = dataclasses.replace(experiment, data=experiment.data.replace(img_size=args.img_size))
    data = experiment.data
    freeze = args.freeze or experiment.model.freeze
    head_init = args.head or (recipe.head_init if recipe is not None else "zero")
    if args.print_config:
        print(json.dumps(experiment.to_dict(), indent=1))
        return 0
    dataset = dataset if dataset is not None else open_dataset(data, "train")
    num_classes = len(getattr(dataset, "dataset", dataset).classes)
    model = finetune_model(base, num_classes, data.img_size)
    num_trainable = apply_freeze_rule(model, freeze, experiment.model.lora_rank)
    lines = recipe_lines(args, experiment, recipe, dataset, model, num_trainable, freeze, head_init)
    print("\n".join(lines), file=sys.stderr)
    if args.compare_freezing:
        print_freezing_report(model.config, freeze, experiment.model.lora_rank)
    out_dir = Path(experiment.train.out_dir)
    # Named by what it was made from, so that preparing another start never overwrites the one a run
    # in this folder began from: the run folder's own checks then name what differs.
    start = out_dir / f"init-{start_digest(checkpoint, num_classes, data.img_size, head_init)}.safetensors"
    if not start.exists():
        if head_init == "probe":
            fit_start_head(model, dataset, data)
        save(merge_lora(model), start)  # a plain ViT: the run adds its own adapters (zero at the start)
    hub = read.hub.as_dict() if read.hub else {}
    model_config = dataclasses.replace(
        experiment.model, init_from=str(start), init_source=hub, overrides={}, freeze=freeze
    )
    experiment = dataclasses.replace(experiment, model=model_config)
    record = {"recipe": lines, "head": head_init, "config": experiment.to_dict()}
    recipe_path = out_dir / "finetune_recipe.json"
    atomic_write(recipe_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    summary = train(experiment)
    if not recipe_path.exists():  # train.resume=never set the folder's earlier run aside, this file with it
        atomic_write(recipe_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    if "last" in summary and freeze != "none":
        summary.update(write_task_delta(summary["last"], checkpoint, out_dir))
    if "last" in summary:
        summary["recipe"] = str(recipe_path)
        print(json.dumps(summary, indent=1))
    return 0


def print_freezing_report(config, freeze: str, lora_rank: int) -> None:
    """--compare-freezing: full fine-tuning against the run's rule (attention-only when it is none)."""
    from ..delta import format_freezing_report, freezing_report

    rules = ("none", freeze if freeze != "none" else "attention-only")
    print(format_freezing_report(freezing_report(config, rules, lora_rank=lora_rank)))


def recipe_lines(
    args, experiment, recipe, dataset, model, num_trainable: int, freeze: str, head_init: str
) -> list[str]:
    """The run's first lines: where the recipe came from, why, its steps and what it trains."""
    from ..train.finetune_recipe import describe

    source = (
        "chosen from the data and checkpoint (--recipe auto)"
        if recipe
        else f"{args.config or 'finetune'} as written"
    )
    lines = [
        f"fine-tuning recipe: {source}",
        *(f"  {reason}" for reason in (recipe.reasons if recipe else ())),
        *(f"  {line}" for line in describe(experiment, num_trainable, model.num_params(), freeze, head_init)),
    ]
    if recipe is not None:
        batch = experiment.data.batch_size * experiment.train.accumulation
        steps = experiment.train.epochs * max(len(dataset) // batch, 1)
        lines.insert(len(recipe.reasons) + 1, f"  steps: {steps} ({len(dataset)} images)")
    return lines


def fit_start_head(model, dataset, data) -> None:
    """The probe start: BatchNorm statistics set to this data's (AdaBN), then the head fitted as a
    linear probe on the frozen features; each step said on stderr."""
    from ..data.transforms import build_transforms
    from ..train.finetune_recipe import fit_probe_head, image_batches, pooled_features, recalibrate_batch_norm

    transform = build_transforms(data, train=False)
    num_norms = recalibrate_batch_norm(model, image_batches(dataset, transform))
    if num_norms:
        print(f"  batch norm: {num_norms} layers' statistics set to this data's (AdaBN)", file=sys.stderr)
    features, labels = pooled_features(model, image_batches(dataset, transform))
    c, accuracy = fit_probe_head(model, features, labels)
    print(
        f"  head: probe (C={c:g}) fitted on {len(labels)} images, train accuracy {accuracy:.2%}",
        file=sys.stderr,
    )


def write_task_delta(last: str, checkpoint: str, out_dir: Path) -> dict[str, str]:
    """The run's task as a delta of its base checkpoint; the class names and data config travel with
    it, as with the checkpoint."""
    from ..delta import save_delta
    from ..eval.classification import CLASSES_KEY, DATA_KEY
    from ..files import read_header
    from ..io import load

    _, metadata = read_header(last)
    task = {key: metadata[key] for key in (CLASSES_KEY, DATA_KEY) if key in metadata}
    delta = save_delta(load(last), checkpoint, out_dir / "delta.safetensors", task)
    return {
        "delta": str(delta),
        "delta_note": f"vitkit.load({checkpoint!r}, delta={str(delta)!r}) rebuilds the task model",
    }


def checkpoint_preprocessing(model, overrides: list[str]) -> dict:
    """The data fields a fine-tuning takes from the checkpoint's preprocessing (mean, std,
    interpolation, eval resize; not the size, which is the recipe's), except those set by `--set`."""
    from ..data import preprocessing_of

    preprocessing = preprocessing_of(model)
    given = {
        override.partition("=")[0].strip().removeprefix("--").removeprefix("data.") for override in overrides
    }
    taken = {
        name: value
        for name, value in preprocessing.as_dict().items()
        if name != "img_size" and name not in given
    }
    print(
        f"preprocessing from {preprocessing.source}: {', '.join(f'{k}={v}' for k, v in taken.items())}",
        file=sys.stderr,
    )
    return taken


# vitkit pretrain ----------------------------------------------------------------------------------
def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="pretrain_cifar10", help="a pre-training experiment in configs/")
    add_set_arg(
        parser, "override a field: masked.masking=blockwise, masked.target=pixels, model.overrides.stem=hmlp"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_pretrain(args: argparse.Namespace) -> int:
    """Masked-patch pre-training (ViT 4.6 mean colour, BeiT blockwise); writes encoder.safetensors."""
    from ..train.pretrain import load_pretrain_experiment, pretrain

    return run_experiment(args, load_pretrain_experiment, pretrain)
