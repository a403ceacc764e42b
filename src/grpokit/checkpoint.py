"""Run directories, whole-or-absent folders, checkpoints and exact resume.

A folder written here (a model, a checkpoint) is built under a hidden temporary name, flushed to disk,
and swapped into place in one atomic rename; a checkpoint also gets a marker file, written last, and a
folder without it is never loaded. A model folder records that grpokit wrote it (`PROVENANCE`), and a path is
replaced only when it is empty or is such a folder and the caller asked (`check_replaceable`). A run directory is
locked while a run writes into it, and a new run never mixes with an old one: it resumes it, replaces it on
request, or is refused; it never deletes or replaces an input the config names. A write the disk refuses (full,
read-only, no permission) is one `WriteError` that says so, naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MARKER = "checkpoint_complete.json"  # written last: a checkpoint folder without it is never loaded
# In every model folder grpokit writes: its kind, so a later write can tell grpokit's own folder (which it may
# replace when asked) from a user's (which it never replaces). Hidden: `from_pretrained` and the hub ignore it.
PROVENANCE = ".grpokit.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# What a run writes into its directory; `overwrite_output_dir` removes exactly these.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "completions.jsonl",
    "tensorboard",
    "wandb",
    "wandb-run-id",
    "curves.png",
    "model",
    "critic.safetensors",  # a PPO run's final critic
)
# Config fields a resumed run may change: how long it runs and how it reports, never what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "max_steps",
        "progress",
        "save_every",
        "save_total_limit",
        "eval_every",
        "log_completions_every",
        "tensorboard",
        "output_dir",
        "reward_timeout",  # a run stopped by a slow reward resumes with a longer limit
        "wandb",
        "wandb_project",
        "distributed",  # how ranks share the work, not what it computes
    }
)


class RunDirectoryError(ValueError):
    """The output folder is in use, holds another run, or its checkpoint cannot be resumed."""


class OutputExistsError(ValueError):
    """A folder would be written where something stands that grpokit did not write as that kind of folder, or
    did write and was not asked to replace."""


class WriteError(OSError):
    """The disk refused a write (no space left, read-only, permission denied, a file size limit): says which
    path, what happened and, once the run adds it (`RunDirectory.__exit__`), what was kept and how to go on."""

    def __init__(self, path: Path, code: int, kept: str = ""):
        self.path, self.kept = Path(path), kept
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        what = WRITE_ERRNOS.get(self.errno, "")
        text = f"could not write {self.path}: {self.strerror.lower()}{f' ({what})' if what else ''}"
        return f"{text}; {self.kept}" if self.kept else text


# The write failures a user can act on, with what to do: the disk, not grpokit, said no.
WRITE_ERRNOS = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "make the folder writable",
    errno.EPERM: "the folder is protected (permissions or an immutable flag): make it writable",
    errno.EFBIG: "a file size limit (`ulimit -f`) stopped it",
    errno.EIO: "the disk reported an I/O error",
}


def write_errno(err: BaseException) -> int | None:
    """The errno of a refused write behind `err`, or None: an OSError anywhere in its chain (torch.save wraps the
    file object's error in a RuntimeError: "unexpected pos ..."), or safetensors' "(os error N)" text."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err.errno
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found and int(found.group(1)) in WRITE_ERRNOS:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turns a write the disk refuses, inside the block, into a WriteError naming `path`; other errors pass."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        code = write_errno(err)
        if code is None:
            raise
        raise WriteError(Path(path), code) from err


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM arrived; the step in flight finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# ---------------------------------------------------------------- whole-or-absent folders


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(ctypes.get_errno(), f"could not swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def temporary_name(path: Path) -> Path:
    """Hidden and unlike `checkpoint-*` or `model`: nothing looking for those can pick it up."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def written_kind(path: Path) -> str | None:
    """What grpokit wrote `path` as (`model`), from its PROVENANCE file; None for anything else."""
    try:
        return json.loads((path / PROVENANCE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_replaceable(path: str | Path, kind: str, *, overwrite: bool, what: str = "", ask: str = "") -> None:
    """`path` may become a `kind` folder: it is absent, an empty folder, or a `kind` folder grpokit wrote and
    `overwrite` asks to replace. Anything else (a file, a run, a user's folder, $HOME) is refused, untouched.
    `what`: how the message names the path (`config field output_dir`); `ask`: how the caller asks to replace."""
    path = Path(path)
    name = f"{what} {str(path)!r}" if what else str(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputExistsError(
            f"{name} is a {'symbolic link' if path.is_symlink() else 'file'}, not a folder: nothing was written; "
            "choose another path"
        )
    if not path.exists():
        return
    entries = sorted((p.name for p in path.iterdir()), key=lambda n: (n.startswith("."), n))  # hidden last
    if not entries:
        return
    found = written_kind(path)
    if found == kind:
        if overwrite:
            return
        raise OutputExistsError(
            f"{name} holds a {kind} folder grpokit wrote earlier: replace it with {ask or 'overwrite=True'}, or "
            "choose another path"
        )
    held = (
        f"a grpokit {'run' if found == 'run' else f'{found} folder'}"
        if found
        else f"files grpokit did not write as a {kind} folder"
    )
    listed = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise OutputExistsError(
        f"{name} holds {held} ({listed}); grpokit replaces only a {kind} folder it wrote itself: nothing was "
        "written; choose another path, or move that folder away first"
    )


@contextlib.contextmanager
def atomic_folder(
    path: str | Path, *, marker: dict[str, Any] | None = None, kind: str | None = None, overwrite: bool = False
) -> Iterator[Path]:
    """Yields a temporary folder to write into; on success it replaces `path` in one rename.

    At every instant `path` is the complete old folder or the complete new one (a kill -9 in between
    leaves the old one, the new one under its hidden temporary name). `marker`: a checkpoint's marker,
    written after every other file is on disk. An error leaves `path` untouched; a write the disk refuses is
    a WriteError naming `path`.

    `kind` (`model`): the folder is marked as grpokit's (PROVENANCE), and an existing `path` is replaced only as
    `check_replaceable` allows, checked before the first byte and again before the swap. Without `kind`, `path`
    is the caller's own (a checkpoint-STEP of the run directory it holds locked).
    """
    path = Path(os.path.abspath(path))  # `.` has no name to put a temporary one beside
    if kind is not None:
        check_replaceable(path, kind, overwrite=overwrite)
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(path):
        tmp.mkdir(parents=True)
    try:
        with writing(path):
            yield tmp
            if kind is not None:
                from grpokit import __version__

                (tmp / PROVENANCE).write_text(json.dumps({"kind": kind, "grpokit": __version__}))
            _fsync_tree(tmp)
            if marker is not None:
                (tmp / MARKER).write_text(json.dumps(marker))
                _fsync_tree(tmp)
            if kind is not None:
                check_replaceable(path, kind, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with writing(path):
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old folder
        else:  # no atomic swap on this file system: a short window with only the hidden copies
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(
    model: Any, tokenizer: Any, path: str | Path, *, state_dict: dict | None = None, overwrite: bool = False
) -> Path:
    """`save_pretrained` (weights from `state_dict` when given) and the tokenizer, atomically, as a model folder
    grpokit wrote. An existing `path` is replaced only when it is empty, or a model folder grpokit wrote and
    `overwrite` is set; anything else is refused untouched (OutputExistsError)."""
    with atomic_folder(path, kind="model", overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return Path(path)


# ---------------------------------------------------------------- checkpoints


def numerics_stop(run_dir: str | Path, where: str, err: Exception) -> str:
    """What a run stopped by a NumericsError says: where, why, and the checkpoint left to resume from."""
    last = list_checkpoints(run_dir)
    keep = f"the last checkpoint (finite, written before it) is {last[-1][1]}" if last else "no checkpoint yet"
    return f"{where}: {err}; nothing of this step was saved, {keep}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for child in Path(run_dir).glob("checkpoint-*"):
        match = CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], *, keep: int) -> Path:
    """checkpoint-STEP, whole or absent: `write(folder)` fills it, then the marker; the newest `keep` stay."""
    path = run_dir / f"checkpoint-{step}"
    with atomic_folder(path, marker={"step": step}) as tmp:
        write(tmp)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return path


def save_state(folder: Path, state: dict[str, Any]) -> None:
    # through a Python file object: a refused write keeps its OSError (errno) behind torch's "unexpected pos"
    with open(folder / STATE_FILE, "wb") as f:
        torch.save(state, f)


def load_state(folder: Path) -> dict[str, Any]:
    if not is_complete(folder):
        raise RunDirectoryError(f"checkpoint {folder} is incomplete (no {MARKER}): its writing was interrupted")
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # a file damaged after it was written
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirectoryError(
            f"checkpoint {folder}: {STATE_FILE} is damaged ({first}); resume from an earlier checkpoint"
        ) from None


def rng_state(**generators: torch.Generator) -> dict[str, Any]:
    """Python's, torch's (CPU and every CUDA device) and the named generators' states."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def python_random_state(saved: Any) -> tuple:
    """A `random.getstate()` tuple back from a checkpoint (the loader gives its inner tuple as a list)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def set_rng_state(state: dict[str, Any], **generators: torch.Generator) -> None:
    random.setstate(python_random_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ---------------------------------------------------------------- the run directory


class RunDirectory:
    """The output folder of one run: checked before any work, locked while written, signals turned into a
    checkpoint.

    `resume_from`: None (a fresh run: the folder must hold no run, unless `overwrite`), `latest` (the newest
    complete checkpoint, or a fresh start when there is none) or a checkpoint folder of this run.
    `writer` False (a rank other than 0 of a torchrun launch): the folder is rank 0's; this object only turns
    signals into a stop request, and the checkpoint to resume is what rank 0 decided (set by the caller).
    """

    def __init__(
        self, path: str | Path, *, config: Any, resume_from: str | None, overwrite: bool, keep: int, writer=True
    ):
        self.path = Path(path)
        self.config = config
        self.resume_from = resume_from
        self.overwrite = overwrite
        self.keep = keep
        self.writer = writer
        self.checkpoint: Path | None = None  # what `open` decided to resume from
        self.stop_signal: int | None = None
        self._lock_file = None
        self._handlers: dict[int, Any] = {}
        self._had_lock = (self.path / ".lock").is_file()  # before this run makes one: an earlier run was here

    @classmethod
    def for_config(cls, cfg: Any, *, writer: bool = True) -> RunDirectory:
        """The run directory of a stage config (output_dir, resume_from_checkpoint, overwrite_output_dir, ...)."""
        return cls(
            cfg.output_dir,
            config=cfg,
            resume_from=cfg.resume_from_checkpoint,
            overwrite=cfg.overwrite_output_dir,
            keep=cfg.save_total_limit,
            writer=writer,
        )

    def holds_run(self) -> list[str]:
        """The names of earlier run output found in the folder."""
        if not self.path.is_dir():
            return []
        names = [n for n in RUN_FILES if (self.path / n).exists()]
        return names + [p.name for _, p in list_checkpoints(self.path)]

    def plan(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh run); raises when the folder cannot be used. A follower
        (`writer` False) leaves that to rank 0."""
        if not self.writer:
            return None
        self._check_inputs()
        self._check_replaced()
        if (self.path / ".lock").exists() and self._lock_file is None:  # a quick look; `__enter__` takes it
            with open(self.path / ".lock", "a+") as probe:
                self._take_lock(probe)
        if self.resume_from is None:
            found = self.holds_run()
            if found and not self.overwrite:
                raise RunDirectoryError(
                    f"output_dir {self.path} holds another run ({', '.join(found[:4])}): resume it with "
                    "`--resume-from-checkpoint latest`, replace it with `--overwrite-output-dir`, or "
                    "choose another output_dir"
                )
            return None
        if self.resume_from == "latest":
            found = list_checkpoints(self.path)
            checkpoint = found[-1][1] if found else None
        else:
            checkpoint = Path(self.resume_from)
            if not checkpoint.is_dir():
                raise RunDirectoryError(f"config field `resume_from_checkpoint`: {checkpoint} does not exist")
            if not is_complete(checkpoint):
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint} is incomplete (no {MARKER}): its "
                    "writing was interrupted; resume from an earlier checkpoint, or `latest`"
                )
            if checkpoint.resolve().parent != self.path.resolve():
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint} is not a checkpoint of output_dir {self.path}"
                )
        if checkpoint is not None:
            self._check_config_matches()
        return checkpoint

    def _check_inputs(self) -> None:
        """No input the config names (model, data, reward model, critic, ...) is the output folder or lies inside
        what a run there deletes or replaces: its RUN_FILES (the final model among them) and checkpoint-STEP."""
        out = self.path.resolve()
        for name, value in _named_paths(self.config):
            source = Path(value).resolve()
            if source == out:
                raise RunDirectoryError(
                    f"config field `{name}` is {value!r}, the output_dir itself: the run would write into its "
                    "input; choose another output_dir"
                )
            if out not in source.parents:
                continue
            top = source.relative_to(out).parts[0]
            if top in RUN_FILES or CHECKPOINT_NAME.fullmatch(top):
                raise RunDirectoryError(
                    f"config field `{name}` is {value!r}, in {out / top}, which a run in output_dir {self.path} "
                    "replaces or deletes (its final model, its checkpoints, `--overwrite-output-dir`): copy it out "
                    "of output_dir, or choose another output_dir"
                )

    def holds_grpokit_run(self) -> bool:
        """The folder is a grpokit run's (PROVENANCE `run`, or the `.lock` every run since locking left behind)."""
        return written_kind(self.path) == "run" or self._had_lock

    def _check_replaced(self) -> None:
        """What the run may replace or delete in its folder is grpokit's own: RUN_FILES names only in a folder a
        grpokit run wrote (`.` may hold a user's `wandb/` or `config.yaml`); `model` (replaced by the final model,
        deleted by `overwrite`) is a model folder grpokit wrote (a run from before PROVENANCE: one with a
        config.json); a checkpoint-STEP folder is a grpokit checkpoint (not another trainer's `checkpoint-500`)."""
        found = [n for n in RUN_FILES if (self.path / n).exists() or (self.path / n).is_symlink()]
        if found and not self.holds_grpokit_run():
            raise RunDirectoryError(
                f"output_dir {self.path} holds {', '.join(found[:4])}, which no grpokit run wrote (no {PROVENANCE} or "
                ".lock): a run there would replace or delete them; choose another output_dir"
            )
        model = self.path / "model"
        earlier_run = written_kind(self.path) is None and self._had_lock and written_kind(model) is None
        if not (earlier_run and (model / "config.json").is_file()):
            what = f"output_dir {self.path}: the run's final model path"
            check_replaceable(model, "model", overwrite=True, what=what)
        for child in sorted(self.path.glob("checkpoint-*")):
            if CHECKPOINT_NAME.fullmatch(child.name) and not _is_grpokit_checkpoint(child):
                raise RunDirectoryError(
                    f"output_dir {self.path} holds {child.name}, which grpokit did not write (no {STATE_FILE}): a "
                    "run there would replace or delete it; move it away, or choose another output_dir"
                )

    def _take_lock(self, lock_file: Any) -> None:
        """flock the folder's lock file; the kernel drops it when the holder exits, kill -9 included."""
        import fcntl

        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise RunDirectoryError(
                f"output_dir {self.path} is in use by a running run ({holder}); wait for it, or choose another "
                "output_dir"
            ) from None

    def _check_config_matches(self) -> None:
        import yaml

        saved_file = self.path / "config.yaml"
        if not saved_file.is_file() or not dataclasses.is_dataclass(self.config):
            return
        saved = yaml.safe_load(saved_file.read_text()) or {}
        current = dataclasses.asdict(self.config)
        changed = sorted(
            k for k in current.keys() | saved.keys() if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
        )
        if changed:
            details = "; ".join(f"`{k}` {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
            raise RunDirectoryError(
                f"cannot resume {self.path}: the config differs from the run's own config.yaml ({details}); "
                f"a resumed run may change only {', '.join(sorted(RESUMABLE_CHANGES - {'output_dir'}))}"
            )

    def __enter__(self) -> RunDirectory:
        if not self.writer:
            self._install_signal_handlers()
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.path / ".lock", "a+")  # noqa: SIM115 - held for the whole run
        try:
            self._take_lock(lock_file)
        except RunDirectoryError:
            lock_file.close()
            raise
        self._lock_file = lock_file
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()
        try:
            self.checkpoint = self.plan()  # again, under the lock
            for stale in self.path.glob(".tmp-*"):  # a killed writer's half folders
                shutil.rmtree(stale, ignore_errors=True)
            if self.checkpoint is None:
                self._clear()
            else:  # a later checkpoint than the one resumed belongs to a future that is being rewritten
                step = checkpoint_step(self.checkpoint)
                for later_step, later in list_checkpoints(self.path):
                    if later_step > step:
                        shutil.rmtree(later)
            with writing(self.path):  # what the folder is: later runs may clear it, `init` never replaces it
                (self.path / PROVENANCE).write_text(json.dumps({"kind": "run"}))
        except BaseException:
            self._release()
            raise
        self._install_signal_handlers()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        self._restore_signal_handlers()
        self._release()
        if isinstance(exc, WriteError) and self.writer and not exc.kept:
            exc.kept = self.kept_after_failed_write()

    def kept_after_failed_write(self) -> str:
        """What a run stopped by a refused write leaves, and how to go on (the run's final model is written last,
        so it was not)."""
        found = list_checkpoints(self.path)
        if not found:
            return "no checkpoint was written yet and the final model was not written; fix that, then run again"
        step, folder = found[-1]
        return (
            f"the last whole checkpoint is {folder} (step {step}); the final model was not written; fix that, then "
            "resume with `--resume-from-checkpoint latest`"
        )

    def _clear(self) -> None:
        """A fresh run's start: the earlier run's files go (`_check_replaced` has made sure `model` and every
        checkpoint-STEP are grpokit's); a user's `checkpoint-best` or other folders stay."""
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        for child in self.path.glob("checkpoint-*"):  # incomplete ones too: nothing can load them
            if CHECKPOINT_NAME.fullmatch(child.name) and _is_grpokit_checkpoint(child):
                shutil.rmtree(child, ignore_errors=True)

    def _release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    # ---------------------------------------------------------------- SIGINT / SIGTERM
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # the second one: stop now, as the user asks
            self._restore_signal_handlers()
            signal.raise_signal(signum)
            return
        self.stop_signal = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def save_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        if not self.writer:
            raise RunDirectoryError(f"{self.path} is written by rank 0 alone")
        return write_checkpoint(self.path, step, write, keep=self.keep)

    def checkpoint_due(self, step: int, last_step: int, every: int) -> bool:
        """After the last step, every `every` steps, and when a signal asked to stop."""
        return step == last_step or (every > 0 and step % every == 0) or self.stop_signal is not None

    def check_stop(self, step: int, checkpoint: Path) -> None:
        """After a step's checkpoint: raise TrainingInterrupted if a signal asked to stop."""
        if self.stop_signal is not None:
            raise TrainingInterrupted(self.stop_signal, step, checkpoint)


def _is_grpokit_checkpoint(folder: Path) -> bool:
    """Written by `write_checkpoint` (its marker, or its state file when the marker is gone)."""
    return folder.is_dir() and ((folder / MARKER).is_file() or (folder / STATE_FILE).is_file())


def _named_paths(config: Any) -> list[tuple[str, str]]:
    """(field, value) of every config field naming an existing file or folder (a list field's entries too), but
    where the run writes (`output_dir`) and what it resumes (`resume_from_checkpoint`)."""
    if not dataclasses.is_dataclass(config):
        return []
    named = []
    for f in dataclasses.fields(config):
        if f.name in ("output_dir", "resume_from_checkpoint"):
            continue
        value = getattr(config, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item and os.path.exists(item):
                named.append((f.name, item))
    return named


def checkpoint_step(folder: Path) -> int:
    match = CHECKPOINT_NAME.fullmatch(Path(folder).name)
    if not match:
        raise RunDirectoryError(f"{folder} is not a checkpoint-STEP folder")
    return int(match.group(1))


def seed_everything(seed: int) -> None:
    """Python's and torch's global RNGs (a stage's own generators are seeded where they are made)."""
    random.seed(seed)
    torch.manual_seed(seed)
