"""The run folder is a contract: one writer, a resume that checks what it resumes, a start-over that never
mixes two runs, a finished run that says so, and the debris of killed writes cleaned before a resume.

    <out_dir>/
        .lock             held (fcntl.flock) by the one process that writes the folder; names it (pid, host)
        config.json       the run's config; rewritten only with a `history.jsonl` entry saying what changed
        history.jsonl     one entry per start, resume (with the schedule changes it brought) and finish
        checkpoints/      resumable states (`state.py`); damaged ones are moved to checkpoints/damaged/
        previous/<time>/  an earlier run of this folder, set aside by `train.resume=never`

What a resume may change: the schedule and the machinery (epochs, max steps, budget, lr, warmup,
batch size, accumulation, precision, devices, logging, evaluation) are recorded in the history and go on
from the checkpoint; anything else (model, data, objective, seed, EMA, optimiser kind) makes the
checkpoint another run's, and the resume is refused naming the keys. A run that has nothing left to
train and recorded its finish is not run again: `RunFinishedError` says so, with its result.

Only the main process calls these functions; `open_run` and `RunFolder` broadcast their outcome to
the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import atomic_write
from . import distributed
from .lora import DEFAULT_LORA_RANK
from .state import check_checkpoint, list_checkpoints

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_CONFIG_NAME = "config.json"
HISTORY_NAME = "history.jsonl"
PREVIOUS_DIR = "previous"
DAMAGED_DIR = "damaged"

# Keys a resume may change: they alter the schedule or how it runs, not what is trained. Any other
# difference makes the checkpoint another run's (default-deny: a new config field is refused until it
# is listed here). train.out_dir (a moved folder) and train.resume (an instruction) are not compared.
SCHEDULE_KEYS = (
    *("train.epochs", "train.max_steps", "train.time_budget_minutes", "train.accumulation"),
    *("train.device", "train.strategy", "train.precision", "train.grad_checkpointing", "train.compile"),
    *("train.deterministic", "train.num_threads", "train.log_every", "train.checkpoint_every"),
    *("train.keep_last", "optim.lr", "optim.min_lr", "optim.warmup_epochs", "optim.schedule"),
    *("optim.clip_grad", "optim.weight_decay", "data.batch_size", "data.num_workers", "data.cache"),
    *("data.cache_dir", "data.shuffle_buffer", "train.progressive_min_size", "train.progressive_end"),
)
SCHEDULE_SECTIONS = ("eval.",)
# model.init_source records what init_from (compared) was made from; runs before it have none.
NOT_COMPARED = ("train.out_dir", "train.resume", "model.init_source")
# Fields added to the config after runs were written: a saved config without one ran with this value.
ADDED_FIELDS = {
    "model.lora_rank": DEFAULT_LORA_RANK,
    "train.progressive_min_size": 0,
    "train.progressive_end": 0.5,
    "eval.shift_tta": 0,
}


class RunFolderError(ValueError):
    """A refusal about the run folder, in one line that says the ways out."""


class RunFinishedError(RunFolderError):
    """The run in the folder is finished and its config asks for nothing more: nothing to train,
    nothing written. Not a failure: the command line says so and exits 0."""


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _who() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


# One writer -----------------------------------------------------------------------------------------
class RunLock:
    """An exclusive `flock` on `<out_dir>/.lock`, whose content names the holder (pid, host, since).

    The kernel drops a flock when its process dies, however it dies, so a lock file whose content
    names a process but which nobody holds is a dead writer's: it is taken over, with a log line. The
    content is cleared on release, so only a writer that died leaves a name behind.
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except json.JSONDecodeError:
            return {}

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            who = (
                f"pid {holder['pid']} on host {holder['host']}, since {holder.get('since', '?')}"
                if "pid" in holder
                else "a process that has not written its name yet"
            )
            raise RunFolderError(
                f"{self.path.parent} is in use by another vitkit run ({who}); wait for it to end, "
                "or use another train.out_dir"
            ) from None
        dead = self._holder()
        if "pid" in dead:
            log.warning(
                "run folder %s: took over the lock of pid %s on host %s (since %s): that process "
                "ended without releasing it",
                *(self.path.parent, dead["pid"], dead["host"], dead.get("since", "?")),
            )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({**_who(), "since": now()}).encode(), 0)
        os.fsync(self.fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


# History --------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file. A last line without its newline is an append that a killed
    process left unfinished: it is dropped (and logged). Any other bad line is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    if lines[-1].strip():
        log.warning("%s: dropped its last line, cut short by a killed write: %r", path, lines[-1][:80])
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{path}:{number}: invalid JSON: {error}") from error
        if not isinstance(row, dict):
            raise RunFolderError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    return rows


def drop_unfinished_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last newline: an append then starts a line of its own
    instead of continuing the fragment a killed write left."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def append_history(out_dir: Path, event: str, **entry: Any) -> None:
    """Append one entry to `history.jsonl` (flushed to disk: it is the record of what happened)."""
    line = json.dumps({"event": event, "time": now(), **_who(), **entry}) + "\n"
    drop_unfinished_line(out_dir / HISTORY_NAME)
    with open(out_dir / HISTORY_NAME, "a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def finished_entry(out_dir: Path, step: int) -> dict[str, Any] | None:
    """The history's `finish` entry of the run at `step`, when its last event is that finish."""
    history = read_jsonl(out_dir / HISTORY_NAME)
    if history and history[-1]["event"] == "finish" and history[-1].get("step") == step:
        return history[-1]
    return None


# Comparing configs ----------------------------------------------------------------------------------
def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"overrides": {"depth": 3}}} -> {"model.overrides.depth": 3}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [saved value, current value]} for every compared key that differs ("<unset>": absent).
    A field added since the saved run counts at its old value where the current config has it (a
    pre-training config has no `eval` section, so no eval.* field is added to it)."""
    new = flatten(current)
    old = {**{key: value for key, value in ADDED_FIELDS.items() if key in new}, **flatten(saved)}
    return {
        key: [old.get(key, "<unset>"), new.get(key, "<unset>")]
        for key in sorted(old.keys() | new.keys())
        if key not in NOT_COMPARED and old.get(key, "<unset>") != new.get(key, "<unset>")
    }


def is_schedule_key(key: str) -> bool:
    return key in SCHEDULE_KEYS or key.startswith(SCHEDULE_SECTIONS)


def check_resume(out_dir: Path, current: dict[str, Any]) -> dict[str, list[Any]]:
    """The schedule changes of `current` against the folder's config.json; RunFolderError (naming the
    keys) when anything else differs. {} when the folder has no config yet."""
    path = out_dir / RUN_CONFIG_NAME
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(
            f"{path}: unreadable ({error}); start over with train.resume=never or use another train.out_dir"
        ) from error
    changes = config_changes(saved, current)
    refused = {key: values for key, values in changes.items() if not is_schedule_key(key)}
    if refused:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise RunFolderError(
            f"{out_dir} holds a run of another config ({listed}; only the schedule may change on resume): "
            f"use a new train.out_dir, or start over in this folder with train.resume=never (the old run "
            f"is moved to {out_dir / PREVIOUS_DIR}/)"
        )
    return changes


def describe_changes(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


# Starting over and debris ---------------------------------------------------------------------------
def set_aside(out_dir: Path, keep: tuple[Path, ...] = ()) -> Path | None:
    """Move the folder's earlier run (everything but the lock, `previous/` and `keep`) to
    `previous/<UTC time>/`; returns that folder, None when there was nothing to move."""
    if not out_dir.is_dir():
        return None
    kept = {LOCK_NAME, PREVIOUS_DIR} | {
        path.name for path in keep if path.parent.resolve() == out_dir.resolve()
    }
    entries = sorted(path for path in out_dir.iterdir() if path.name not in kept)
    if not entries:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = out_dir / PREVIOUS_DIR / stamp
    number = 1
    while target.exists():
        number += 1
        target = out_dir / PREVIOUS_DIR / f"{stamp}-{number}"
    target.mkdir(parents=True)
    for path in entries:
        path.rename(target / path.name)
    print(f"train.resume=never: moved the earlier run of {out_dir} to {target}", file=sys.stderr)
    return target


def clean_debris(out_dir: Path) -> None:
    """Before a resume: delete the temporary files of killed writes, and the checkpoint folders a kill
    cut short (no COMPLETE marker: a save; files missing: a retention), one log line for each. Damaged
    checkpoints (checksums) are the resume's to find: see `set_damaged_aside`."""
    checkpoints = out_dir / "checkpoints"
    temporary = [*out_dir.glob(".*.tmp"), *checkpoints.glob("step-*/.*.tmp")]
    for path in temporary:
        path.unlink()
    if temporary:
        log.warning("run folder %s: deleted %d temporary files of killed writes", out_dir, len(temporary))
    for folder in list_checkpoints(checkpoints):
        reason = check_checkpoint(folder, checksums=False)
        if reason is not None:
            shutil.rmtree(folder)
            log.warning("run folder %s: deleted checkpoint %s, cut short: %s", out_dir, folder.name, reason)


def set_damaged_aside(folder: Path, reason: str) -> Path:
    """Move a complete checkpoint whose files fail their checksums to checkpoints/damaged/, for
    inspection (retention would otherwise count it among the newest and delete a good one)."""
    damaged = folder.parent / DAMAGED_DIR / folder.name
    if damaged.exists():
        shutil.rmtree(damaged)
    damaged.parent.mkdir(exist_ok=True)
    folder.rename(damaged)
    log.warning("resume: skipping checkpoint %s (%s), moved to %s", folder.name, reason, damaged)
    return damaged


def newest_valid_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; newer damaged ones are set aside."""
    for folder in list_checkpoints(checkpoints):
        reason = check_checkpoint(folder)
        if reason is None:
            return folder
        set_damaged_aside(folder, reason)
    return None


def finished_message(out_dir: Path, entry: dict[str, Any], limit: str, changes: dict[str, list[Any]]) -> str:
    """The one line that a re-run of a finished run gets: its result, and the ways to train on."""
    if "top1" in entry:
        result = f", {entry['split']} top-1 {entry['top1']:.2%}"
    elif "loss" in entry:
        result = f", {entry['split']} loss {entry['loss']:.4g}"
    else:
        result = ""
    key = limit.partition("=")[0]
    return (
        f"the run in {out_dir} is already finished (step {entry['step']}, epoch {entry['epoch']}{result}): "
        f"nothing is left to train with {describe_changes(changes) if changes else limit}. To train on, "
        f"raise {key} (a schedule "
        f"change, recorded in {out_dir / HISTORY_NAME}; training continues from the last checkpoint); to "
        f"train again, use train.resume=never (the finished run is moved to {out_dir / PREVIOUS_DIR}/) or a "
        "new train.out_dir"
    )


# The contract as one call ---------------------------------------------------------------------------
class RunFolder:
    """A run folder held by this run (`open_run`): what the start found (schedule changes, where an
    earlier run was set aside, the checkpoint to resume from) and the history's entries to come.
    Every rank holds one; only the main process writes."""

    def __init__(self, out_dir: Path, config: dict[str, Any], main: bool):
        self.out_dir, self.config, self.main = out_dir, config, main
        self.changes: dict[str, list[Any]] = {}
        self.previous_run: Path | None = None
        self.checkpoint: Path | None = None

    def prepare(self, resume: str, keep: tuple[Path, ...]) -> None:
        """Set the folder's earlier run aside (resume="never"), or check this config against the
        folder's, clean the debris of killed writes and find the newest valid checkpoint."""

        def on_main() -> tuple[dict[str, list[Any]], Path | None, Path | None]:
            if resume == "never":
                return {}, set_aside(self.out_dir, keep), None
            changes = check_resume(self.out_dir, self.config)
            clean_debris(self.out_dir)
            return changes, None, newest_valid_checkpoint(self.out_dir / "checkpoints")

        self.changes, self.previous_run, self.checkpoint = distributed.on_main_process(self.main, on_main)

    def check_finished(self, step: int, limit: str | None) -> None:
        """A resumed run with nothing left to train (`limit` names the setting that says so) whose
        finish is recorded is not run again: the same config is told so (RunFinishedError), changes
        that leave nothing to train are refused. One killed after its last checkpoint has no finish
        entry: it goes on and writes what it had not."""
        if limit is None:
            return
        entry = distributed.on_main_process(self.main, lambda: finished_entry(self.out_dir, step))
        if entry is None:
            return
        message = finished_message(self.out_dir, entry, limit, self.changes)
        raise (RunFolderError if self.changes else RunFinishedError)(message)

    def record_start(self, resumed_step: int | None, world_size: int, class_to_idx: dict[str, int]) -> None:
        """This start's entry in history.jsonl (with its schedule changes), then the config (rewritten
        only after the history says what changed) and the class names."""
        if not self.main:
            return
        common = {"world_size": world_size, "changes": self.changes}
        if resumed_step is None:
            previous = str(self.previous_run) if self.previous_run else None
            append_history(self.out_dir, "start", step=0, previous_run=previous, config=self.config, **common)
        else:
            checkpoint = str(self.checkpoint)
            append_history(self.out_dir, "resume", step=resumed_step, checkpoint=checkpoint, **common)
        if self.changes:
            print(
                f"resume: schedule changes recorded in {self.out_dir / HISTORY_NAME}: "
                f"{describe_changes(self.changes)}",
                file=sys.stderr,
            )
        _write_text(self.out_dir / RUN_CONFIG_NAME, json.dumps(self.config, indent=1) + "\n")
        _write_text(self.out_dir / "class_to_idx.json", json.dumps(class_to_idx, indent=1) + "\n")

    def record_finish(self, **entry: Any) -> None:
        if self.main:
            append_history(self.out_dir, "finish", **entry)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def open_run(
    out_dir: str | Path, config: dict[str, Any], *, resume: str, keep: tuple[Path, ...], main: bool
) -> Iterator[RunFolder]:
    """The run folder's contract in one call: the lock, held by the main process for the whole run
    (a second writer's refusal stops every rank at once), then the earlier run set aside or the
    config compared and the debris cleaned, and the checkpoint to resume from found."""
    out_dir = Path(out_dir)
    lock = RunLock(out_dir)
    distributed.on_main_process(main, lock.acquire)
    try:
        folder = RunFolder(out_dir, config, main)
        folder.prepare(resume, keep)
        yield folder
    finally:
        lock.release()
