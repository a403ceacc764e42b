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
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from grpokit.runtime.weight_files import MAX_SHARD_SIZE, shard_size_bytes

MARKER = "checkpoint_complete.json"  # written last: a checkpoint folder without it is never loaded
# In every model folder grpokit writes: its kind, so a later write can tell grpokit's own folder (which it may
# replace when asked) from a user's (which it never replaces). Hidden: `from_pretrained` and the hub ignore it.
PROVENANCE = ".grpokit.json"
STATE_FILE = "trainer_state.pt"
RECORD_FILE = "run_record.json"  # in each checkpoint: what it continues (`run_record`), checked before any resume
RUN_ID_FILE = "run_id"  # in the run directory: the identity its checkpoints must carry
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # set in every rank's environment by torchrun's agent
CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9]\d*)")  # as grpokit names them: `checkpoint-01` is a copy of yours
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
    RUN_ID_FILE,
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
        "ddp_timeout",  # how long a rank waits for the others
        "num_threads",  # how many CPU threads compute it (rounding may differ; config.yaml records the new count)
        "max_shard_size",  # how the weights are cut into files, not what they are
    }
)


# Config fields naming an input the record fingerprints: the path may change (a folder moved) when what it holds
# did not.
MOVABLE_INPUTS = frozenset({"model", "train_data", "eval_data", "critic_model"})
# The command that writes each stage's checkpoints, for the message that refuses one stage's checkpoint in another.
STAGE_COMMANDS = {
    "GRPOConfig": "grpokit train",
    "PPOConfig": "grpokit ppo",
    "SFTConfig": "grpokit sft",
    "RewardModelConfig": "grpokit reward-model",
}


class RunDirectoryError(ValueError):
    """The output folder is in use, holds another run, or its checkpoint cannot be resumed."""


class FinishedRunError(RunDirectoryError):
    """The checkpoint to resume is the last step of a run that finished: nothing is left to continue."""


class ResumeWarning(UserWarning):
    """A resume that goes ahead but cannot prove all it continues (a checkpoint older than its record)."""


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
    errno.EACCES: "make it writable",
    errno.EPERM: "it is protected (permissions, or an immutable or append-only flag): make it writable",
    errno.EFBIG: "a file size limit (`ulimit -f`) stopped it",
    errno.EIO: "the disk reported an I/O error",
    errno.ENAMETOOLONG: "a name or path longer than the file system allows: choose a shorter output_dir",
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
        raise WriteError(_refused_path(err, Path(path)), code) from err


def _refused_path(err: BaseException | None, folder: Path) -> Path:
    """The file the disk refused (an OSError's filename in `err`'s chain: a protected metrics.jsonl rather than
    its writable folder), else `folder`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and isinstance(err.filename, (str, os.PathLike)):
            refused = Path(err.filename2 or err.filename)  # a rename's target, where it has one
            # a hidden temporary name (`temporary_name`, a log's rewrite) is named as what it becomes
            return Path(*(re.sub(r"^\.(?:tmp|old)-(.+?)(-\d+)?$", r"\1", part) for part in refused.parts))
        err = err.__cause__ or err.__context__
    return folder


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


def replaced_whole_above(path: str | Path) -> str | None:
    """What folder above `path` grpokit replaces or deletes whole, described (None: none): a model folder it wrote (a
    later `init` or final save replaces it), or another run's checkpoint-STEP, final model or other run files
    (pruning, a resume or `--overwrite-output-dir` there deletes them). Anything written inside would go with it."""
    here = Path(os.path.abspath(path))
    for parent in here.parents:
        kind = written_kind(parent)
        top = here.relative_to(parent).parts[0]
        if kind == "model":
            return f"{parent}, a model folder grpokit wrote"
        if kind == "run" and (top in RUN_FILES or CHECKPOINT_NAME.fullmatch(top)):
            return f"{parent / top}, part of the run in {parent}"
    return None


def check_model_destination(path: str, what: str = "output_dir") -> None:
    """Where `init` / `fetch-model` may write a model folder, before anything is built: a path (not empty, no
    unexpanded `~`, names the file system takes), not the working folder, the home folder or `/` (a folder is
    replaced by a rename: the shell would be left in a deleted folder), and not inside a folder grpokit replaces
    or deletes whole."""
    from grpokit.core.types import check_path_length

    if path == "" or path.startswith("~"):
        raise OutputExistsError(
            f"{what} is {path!r}: "
            + ("give the folder to write" if not path else "`~` is not expanded here: write the full path")
        )
    target = check_path_length(path, what).resolve()
    special = {Path.cwd().resolve(): "the working folder", Path.home().resolve(): "the home folder", Path("/"): "/"}
    if target in special:
        raise OutputExistsError(
            f"{what} is {path!r}, {special[target]}: a model folder is written whole and replaces what is there; "
            "give a folder of its own"
        )
    inside = replaced_whole_above(target)
    if inside:
        raise OutputExistsError(
            f"{what} {path!r} lies inside {inside}, which grpokit replaces or deletes whole: the model would go with "
            "it; choose a folder outside it"
        )


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
        added = foreign_files(path)
        if added:
            raise OutputExistsError(
                f"{name} is a {kind} folder grpokit wrote, but {', '.join(added[:4])} in it are not files grpokit "
                "wrote: replacing the folder would delete them; move them out, or choose another path"
            )
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
    path: str | Path,
    *,
    marker: dict[str, Any] | None = None,
    kind: str | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yields a temporary folder to write into; on success it replaces `path` in one rename.

    At every instant `path` is the complete old folder or the complete new one (a kill -9 in between
    leaves the old one, the new one under its hidden temporary name). `marker`: a checkpoint's marker,
    written after every other file is on disk. An error leaves `path` untouched; a write the disk refuses is
    a WriteError naming `path`.

    `kind` (`model`): the folder is marked as grpokit's (PROVENANCE), and an existing `path` is replaced only as
    `check_replaceable` allows, checked before the first byte and again before the swap. Without `kind`, `path`
    is the caller's own (a checkpoint-STEP of the run directory it holds locked). `provenance`: more entries for
    PROVENANCE, read when the block ends (the block may fill them in: how its weights were written).
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

                # the names it holds: a later replace finds a file a user added (a model card) and keeps it
                written = sorted(p.name for p in tmp.iterdir())
                record = {"kind": kind, "grpokit": __version__, "files": written, **(provenance or {})}
                (tmp / PROVENANCE).write_text(json.dumps(record))
            _fsync_tree(tmp)
            if marker is not None:
                # with the names it holds: pruning or a rewrite finds a file a user added later, and keeps it
                (tmp / MARKER).write_text(json.dumps({**marker, "files": sorted(p.name for p in tmp.iterdir())}))
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
            remove_left_over(tmp, f"the previous {path.name} it replaced")  # now the old folder
        else:  # no atomic swap on this file system: a short window with only the hidden copies
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write one file under; on success the file is synced and replaces
    `path` in one rename, so `path` is always the whole old file or the whole new one. An error leaves `path` as it
    was and no temporary behind; a write the disk refuses is a WriteError naming `path`."""
    path = Path(os.path.abspath(path))
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with writing(path):
            yield tmp
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            tmp.replace(path)
            _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    state_dict: dict | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> Path:
    """`save_pretrained` (weights from `state_dict` when given; files of at most `max_shard_size`, a larger model in
    shards and an index: `weight_files`) and the tokenizer, atomically, as a model folder grpokit wrote. An existing
    `path` is replaced only when it is empty, or a model folder grpokit wrote and `overwrite` is set; anything else
    is refused untouched (OutputExistsError)."""
    limit = shard_size_bytes(max_shard_size)
    with atomic_folder(path, kind="model", overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, max_shard_size=limit)
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
    """Complete checkpoints of a run, oldest first: checkpoint-N folders with a marker that says step N (a copy
    renamed checkpoint-100 whose marker says step 1 is not step 100: `misnamed_checkpoints`)."""
    found = []
    for child in Path(run_dir).glob("checkpoint-*"):
        match = CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child) and marker_step(child) in (None, int(match.group(1))):
            found.append((int(match.group(1)), child))
    return sorted(found)


def marker_step(folder: Path) -> int | None:
    """The step a checkpoint's marker records (None: a marker written without one, or unreadable)."""
    try:
        step = json.loads((folder / MARKER).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def misnamed_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoint-N folders whose marker records another step: renamed copies, never resumed or pruned."""
    return sorted(
        child.name
        for child in Path(run_dir).glob("checkpoint-*")
        if (match := CHECKPOINT_NAME.fullmatch(child.name))
        and child.is_dir()
        and is_complete(child)
        and marker_step(child) not in (None, int(match.group(1)))
    )


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], *, keep: int) -> Path:
    """checkpoint-STEP, whole or absent: `write(folder)` fills it, then the marker; the newest `keep` stay."""
    path = run_dir / f"checkpoint-{step}"
    with atomic_folder(path, marker={"step": step}) as tmp:
        write(tmp)
    if keep > 0:
        linked = _linked_from(run_dir)  # `checkpoint-best -> checkpoint-1`, `marks/best -> ../checkpoint-1`
        for _, old in list_checkpoints(run_dir)[:-keep]:
            if any(target == old.resolve() or old.resolve() in target.parents for target in linked):
                warnings.warn(f"{old} is kept past save_total_limit: a link in {run_dir} points to it", stacklevel=2)
                continue
            added = foreign_files(old)
            if added:
                warnings.warn(f"{old} is kept past save_total_limit: it holds {', '.join(added[:3])}, which grpokit "
                              "did not write", stacklevel=2)  # fmt: skip
                continue
            remove_left_over(old, "an older checkpoint than the newest save_total_limit")
    return path


def _linked_from(run_dir: Path) -> set[Path]:
    """What the links in a run folder (and in its folders other than checkpoints, model/ and tensorboard/) point to."""
    linked = set()
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        for name in dirs + files:
            if (here / name).is_symlink():
                linked.add((here / name).resolve())
        dirs[:] = [d for d in dirs if not (here / d).is_symlink() and not CHECKPOINT_NAME.fullmatch(d)
                   and d not in ("model", "tensorboard") and not d.startswith(".")]  # fmt: skip
    return linked


def foreign_files(folder: Path) -> list[str]:
    """Files in a folder grpokit writes whole and later deletes or replaces (a model folder, a checkpoint, the run's
    TensorBoard folder) that grpokit did not write: a model card, a user's notes, another run's events. A model
    folder's PROVENANCE and a checkpoint's marker list what grpokit wrote (one marked before the list: nothing is
    taken as foreign); TensorBoard's folder holds only event files."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    if folder.name == "tensorboard":
        return [n for n in names if not (n.startswith("events.out.tfevents.") and (folder / n).is_file())]
    written = None
    for listing in (PROVENANCE, MARKER):
        try:
            written = json.loads((folder / listing).read_text()).get("files")
            break
        except (OSError, ValueError, AttributeError):
            continue
    if not isinstance(written, list):
        return []
    return [n for n in names if n not in written and n not in (PROVENANCE, MARKER)]


def remove_left_over(folder: Path, what: str) -> None:
    """Deletes a folder nothing needs any more (`what` it is); one the disk will not let go of (an immutable file, a
    read-only mount) stays, said once, and the run goes on: nothing is lost by keeping it."""
    try:
        shutil.rmtree(folder)
    except OSError as err:
        warnings.warn(f"could not delete {folder} ({what}): {err}; it stays: delete it by hand", stacklevel=2)


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


# ---------------------------------------------------------------- what a checkpoint proves

# Below this size a file is hashed whole; above it (a 7B model's shards) its size, its first MiB (a safetensors file's
# header: every tensor's name, dtype, shape and offsets) and blocks spread evenly over the rest: another model, or the
# same one trained further, differs in every block, and a resume reads a few MiB per shard instead of gigabytes.
WHOLE_FILE_BYTES = 64 << 20
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 256 << 10
# The files of a model folder that decide what it computes (weights, configs, tokenizer); a README does not.
MODEL_FILE_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken"}
)


def _file_digest(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\n".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            return
        digest.update(f.read(1 << 20))
        for i in range(SAMPLED_BLOCKS):
            f.seek((1 << 20) + (size - (1 << 20) - BLOCK_BYTES) * i // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))


def _module_digest(model: Any, digest: Any) -> None:
    """A model object: every tensor's name, dtype and shape, and its values (a strided sample of a large one)."""
    import torch

    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > (1 << 20):
            flat = flat[:: flat.numel() // (1 << 16)]
        digest.update(flat.to("cpu", torch.float32).numpy().tobytes())


def fingerprint_source(source: Any) -> dict[str, Any] | None:
    """What a model input holds, cheaply: a local folder's model files (`MODEL_FILE_SUFFIXES`; names, sizes and
    contents, sampled for files over `WHOLE_FILE_BYTES`), a single file (a GGUF), or a model object's tensors. A
    hub id, or a path that is not there, is recorded by its name: that is all a resume can compare."""
    if source is None:
        return None
    digest = hashlib.sha256()
    if not isinstance(source, (str, Path)):
        _module_digest(source, digest)
        return {"object": type(source).__name__, "sha256": digest.hexdigest()}
    path = Path(os.path.expanduser(source))  # (`~tiny`, no user tiny: the name as written, not an error)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in MODEL_FILE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        return {"name": str(source)}
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\n".encode())
        _file_digest(file, digest)
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


def fingerprint_rows(rows: Any) -> dict[str, Any]:
    """The rows a stage actually uses (after loading and filtering): their number and a hash of their contents,
    so a file edited to the same row count still differs. Each row is hashed in a canonical form
    (`_canonical_value`) that is the same in every process and covers every element of an array."""
    digest = hashlib.sha256()
    for i, row in enumerate(rows):
        canonical = _canonical_value(row, f"row {i}")
        digest.update(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return {"rows": len(rows), "sha256": digest.hexdigest()}


def _canonical_value(value: Any, where: str) -> Any:
    """`value` as JSON that depends only on its contents: arrays and tensors by dtype, shape and a hash of their
    bytes (a repr elides the middle of a long one with `...`), dates and the like by their text. Anything else is
    refused (a DataError naming `where`): its repr may hold a memory address, so no resume could match it."""
    import datetime
    import decimal

    import numpy

    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(key): _canonical_value(item, f"{where}, key {key!r}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(item, f"{where}[{j}]") for j, item in enumerate(value)]
    if isinstance(value, numpy.generic):
        return _canonical_value(value.item(), where)
    if isinstance(value, numpy.ndarray) and value.dtype != object:
        data = numpy.ascontiguousarray(value).tobytes()
        return {"ndarray": value.dtype.str, "shape": list(value.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, numpy.ndarray):  # of Python objects: its bytes are their addresses
        return {"ndarray": "object", "items": _canonical_value(value.tolist(), where)}
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        return {"tensor": str(value.dtype), "shape": list(value.shape), "sha256": digest}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(value).hexdigest()}
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal, uuid.UUID, Path)):
        return {type(value).__name__: str(value)}
    from grpokit.core.types import DataError

    raise DataError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a run's record cannot "
        "fingerprint (its text may hold a memory address, so a resume could never match it): give the data as "
        "text, numbers, lists, dicts, numpy arrays or tensors"
    )


def fingerprint_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer object handed in (not loaded from the model folder, whose files `fingerprint_source` covers):
    its vocabulary and special tokens, which decide every token id the run saw."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    text = json.dumps([type(tokenizer).__name__, vocab, special], ensure_ascii=False)
    return {"object": type(tokenizer).__name__, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _describe(fingerprint: dict[str, Any] | None) -> str:
    if fingerprint is None:
        return "none"
    if "name" in fingerprint:  # a hub id, or a path that is not there
        return repr(fingerprint["name"])
    if "rows" in fingerprint:
        size = f"{fingerprint['rows']} rows"
    elif "files" in fingerprint:
        size = f"{fingerprint['files']} files, {fingerprint['bytes']} bytes"
    else:
        size = f"a {fingerprint.get('object')} object"
    return f"{size}, sha256 {fingerprint['sha256'][:12]}"


def _same_setting(key: str, saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """`key` means the same in a saved config and the current one. A field the saved config lacks came with a later
    grpokit: at its default it does what the older run did (a new field's default keeps the old behaviour)."""
    if key not in saved and key in defaults:
        return current.get(key) == defaults[key]
    return saved.get(key) == current.get(key)


def record_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What makes the run described by `current` (a record as `RunDirectory.record` makes it) another run than the
    checkpoint's `recorded` one: the stage, config fields outside RESUMABLE_CHANGES (a moved input whose contents
    match aside), and the inputs' fingerprints; each as `field` old -> new."""
    if recorded.get("stage") != current["stage"]:
        was, now = recorded.get("stage"), current["stage"]
        return [f"it was written by `{STAGE_COMMANDS.get(was, was)}`, not `{STAGE_COMMANDS.get(now, now)}`"]
    old_inputs, new_inputs = recorded.get("inputs", {}), current["inputs"]
    old_config, new_config = recorded.get("config", {}), current["config"]
    found = []
    defaults = current.get("defaults", {})
    for key in sorted(old_config.keys() | new_config.keys()):
        moved = key in MOVABLE_INPUTS and key in new_inputs and old_inputs.get(key) == new_inputs[key]
        if key not in RESUMABLE_CHANGES and not moved and not _same_setting(key, old_config, new_config, defaults):
            found.append(f"`{key}` {old_config.get(key)!r} -> {new_config.get(key)!r}")
    for key in sorted(old_inputs.keys() | new_inputs.keys()):
        if old_inputs.get(key) != new_inputs.get(key):
            if key == "reward_models":
                was, now = old_inputs.get(key) or {}, new_inputs.get(key) or {}
                for name in sorted(was.keys() | now.keys()):
                    if was.get(name) != now.get(name):
                        found.append(f"reward model {name}: {_describe(was.get(name))} -> {_describe(now.get(name))}")
                continue
            what = "the rows" if key.endswith("_data") else "the object" if key == "tokenizer" else "the contents"
            found.append(f"{what} of `{key}`: {_describe(old_inputs.get(key))} -> {_describe(new_inputs.get(key))}")
    return found


# ---------------------------------------------------------------- the run directory


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a run directory reads of its stage's config (`run_setup.run_directory` takes it from one): recorded in
    each checkpoint, matched on resume, and checked against the folder before any work."""

    stage: str
    """The config's class (GRPOConfig, PPOConfig, SFTConfig, RewardModelConfig): a checkpoint continues only its own
    stage's run."""
    resolved_config: dict[str, Any]
    """The config as JSON values (nested sections as dicts), as the record keeps it."""
    max_steps: int | None
    logs_every_step: bool
    """GRPO and PPO log every step (SFT and reward-model training every few): a folder whose metrics stop before a
    checkpoint's step holds a checkpoint written elsewhere."""
    input_paths: tuple[tuple[str, str], ...]
    """(field, text) of every text a config field holds (a list field's entries too), but where the run writes
    (`output_dir`) and what it resumes (`resume_from_checkpoint`): those that name an existing file or folder are
    inputs the run must not write into, replace or delete (`existing_paths`)."""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Each config field's default, as JSON values: a field an older checkpoint's config lacks matches at it."""


class RunDirectory:
    """The output folder of one run: checked before any work, locked while written, signals turned into a
    checkpoint.

    `resume_from`: None (a fresh run: the folder must hold no run, unless `overwrite`), `latest` (the newest
    complete checkpoint; an error when there is none) or a checkpoint folder of this run. The checkpoint to resume
    must prove it continues this run (`verify`): the run's identity, stage, config (`settings`; None: a look at a
    folder that runs nothing) and `inputs` (`run_setup.run_inputs`) as its record has them. `writer` False (a rank
    other than 0 of a torchrun launch): the folder is rank 0's; this object only turns signals into a stop request,
    and the checkpoint to resume is what rank 0 decided (set by the caller).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        settings: RunSettings | None,
        resume_from: str | None,
        overwrite: bool,
        keep: int,
        writer=True,
        inputs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.settings = settings
        self.resume_from = resume_from
        self.overwrite = overwrite
        self.keep = keep
        self.writer = writer
        self.inputs = inputs or {}
        # None: a look at the folder before the stage has read its inputs (compare's parent); the stage checks them
        self.checks_inputs = inputs is not None
        self.checkpoint: Path | None = None  # what `open` decided to resume from
        self.run_id: str | None = None  # the run's identity, written to RUN_ID_FILE at its fresh start
        # the signal the run stops for after this step: this process's, or another rank's (`run_loop` agrees on it)
        self.stop_signal: int | None = None
        self._signalled = False  # this process got a signal (its second one stops at once, but under torchrun)
        self._lock_file = None
        self._handlers: dict[int, Any] = {}
        self._had_lock = (self.path / ".lock").is_file()  # before this run makes one: an earlier run was here

    def record(self, step: int) -> dict[str, Any]:
        """What checkpoint-STEP of this run records: the run's identity, its stage, its resolved config and the
        fingerprints of its inputs; a resume checks them against the run resuming it."""
        return {"run_id": self.run_id, "stage": self.settings.stage, "step": step,
                "config": self.settings.resolved_config, "inputs": self.inputs,
                "defaults": self.settings.defaults}  # fmt: skip

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
            self._check_left_alone(None)
            return None
        if self.resume_from == "latest":
            found = list_checkpoints(self.path)
            if not found:
                raise RunDirectoryError(self._nothing_to_resume())
            checkpoint = found[-1][1]
            copies = misnamed_checkpoints(self.path)
            if copies:
                warnings.warn(
                    f"resume_from_checkpoint `latest`: {', '.join(copies[:3])} in {self.path} records another step in "
                    f"its {MARKER} than its name says (a renamed copy?): not resumed, not pruned, left as it is",
                    ResumeWarning,
                    stacklevel=2,
                )
            skipped = self._incomplete_after(found[-1][0])
            if skipped:
                warnings.warn(
                    f"resume_from_checkpoint `latest` is {checkpoint.name}: the newer {', '.join(skipped[:3])} "
                    f"is incomplete (no {MARKER}: its writing was interrupted) and is not used",
                    ResumeWarning,
                    stacklevel=2,
                )
        else:
            checkpoint = Path(self.resume_from)
            if not checkpoint.is_dir():
                raise RunDirectoryError(f"config field `resume_from_checkpoint`: {checkpoint} does not exist")
            if not is_complete(checkpoint) and not (checkpoint / STATE_FILE).exists():
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint} is not a checkpoint (a checkpoint-STEP "
                    f"folder holds {STATE_FILE} and {MARKER})"
                    + (
                        "; it is a model folder: give it as `model` to start a new run from it"
                        if (checkpoint / "config.json").is_file()
                        else ""
                    )
                )
            if not is_complete(checkpoint):
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint} is incomplete (no {MARKER}): its "
                    "writing was interrupted; resume from an earlier checkpoint, or `latest`"
                )
            if checkpoint.name in misnamed_checkpoints(checkpoint.parent):
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint}'s {MARKER} records step "
                    f"{marker_step(checkpoint)}, not the step its name says (a renamed copy?): resume the folder of "
                    "that step, named as it was written"
                )
            if checkpoint.resolve().parent != self.path.resolve():
                raise RunDirectoryError(
                    f"config field `resume_from_checkpoint`: {checkpoint} is not a checkpoint of output_dir {self.path}"
                )
        self.verify(checkpoint)
        self._check_no_copy_ahead(checkpoint_step(checkpoint))
        self._check_logged_through(checkpoint)
        self._check_left_alone(checkpoint)
        return checkpoint

    def _check_no_copy_ahead(self, step: int) -> None:
        """A renamed copy (`misnamed_checkpoints`) at a step this run will write would be replaced by it: refused
        before any step, so that the copy is moved by its owner, not lost."""
        max_steps = self.settings.max_steps if self.settings else None
        for name in misnamed_checkpoints(self.path):
            if max_steps is not None and step < checkpoint_step(self.path / name) <= max_steps:
                raise RunDirectoryError(
                    f"{self.path / name} records step {marker_step(self.path / name)} in its {MARKER} (a renamed "
                    f"copy?), and this run will write its own {name}, which would replace it: move or rename the copy "
                    "first"
                )

    def _check_logged_through(self, checkpoint: Path) -> None:
        """A GRPO or PPO run logs every step before its checkpoint: a folder whose metrics.jsonl stops before the
        checkpoint's step holds a checkpoint written elsewhere (another copy of the run, which shares its id), and
        continuing it would leave those steps out of the record."""
        if self.settings is None or not self.settings.logs_every_step:
            return
        metrics = self.path / "metrics.jsonl"
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            return
        logged = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                logged.append(row["step"])
        step = checkpoint_step(checkpoint)
        if logged and max(logged) < step:
            raise RunDirectoryError(
                f"cannot resume {checkpoint}: {metrics} stops at step {max(logged)}, before the checkpoint's step "
                f"{step}, so the checkpoint was written elsewhere (by a copy of this run?) and steps "
                f"{max(logged) + 1}-{step} would be missing from this run's record; resume it in the folder that wrote "
                "it, or copy that whole folder"
            )

    def _incomplete_after(self, step: int) -> list[str]:
        """Names of incomplete checkpoint-N folders with N > step, oldest first."""
        later = []
        for child in self.path.glob("checkpoint-*"):
            match = CHECKPOINT_NAME.fullmatch(child.name)
            if match and int(match.group(1)) > step and child.is_dir() and not is_complete(child):
                later.append((int(match.group(1)), child.name))
        return [name for _, name in sorted(later)]

    def _nothing_to_resume(self) -> str:
        """Why `latest` finds nothing, with what the folder holds: resuming must never quietly become a fresh
        start over a run's trained model (TRL's Trainer refuses the same: "No valid checkpoint found")."""
        fresh = "to start a fresh run, leave out resume_from_checkpoint (`--resume-from-checkpoint`)"
        if not self.path.exists():
            what = "does not exist (a misspelled path?):"
        else:
            held = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))  # not grpokit's own
            incomplete = [name for name in held if CHECKPOINT_NAME.fullmatch(name)]
            if incomplete:
                what = (
                    f"holds only incomplete checkpoints ({', '.join(incomplete[:3])}: their writing was interrupted);"
                )
            elif held:
                what = f"holds no checkpoint-* folder (it holds {', '.join(held[:5])});"
            else:
                what = "holds nothing: it is empty;"
        if self.holds_run():
            fresh += " and add `--overwrite-output-dir` to replace the run it holds"
        return f"resume_from_checkpoint `latest`: output_dir {self.path} {what} nothing to resume; {fresh}"

    def verify(self, checkpoint: Path) -> None:
        """Refuses a checkpoint that does not continue this run: its record (written by `save_checkpoint`) must
        name this folder's run, this stage, the same config (RESUMABLE_CHANGES aside) and the same inputs. The
        record is authoritative: config.yaml, which a user may delete or edit, is only read for a checkpoint
        written before records existed (accepted with a ResumeWarning, as refusing would strand every run in
        progress across an upgrade, and the checks it had then still apply)."""
        step = checkpoint_step(checkpoint)
        max_steps = self.settings.max_steps if self.settings else None
        if max_steps is not None and step > max_steps:
            raise RunDirectoryError(f"{checkpoint} is past max_steps = {max_steps}: raise max_steps to resume it")
        if max_steps is not None and step == max_steps and _written_after(self.path / "model", checkpoint):
            raise FinishedRunError(
                f"{checkpoint} is the last step of a finished run (max_steps = {max_steps}, its model is in "
                f"{self.path / 'model'}): nothing to resume; raise max_steps to train it further"
            )
        record_file = checkpoint / RECORD_FILE
        if not record_file.is_file():
            warnings.warn(
                f"checkpoint {checkpoint} has no {RECORD_FILE} (written by an older grpokit): only its config.yaml "
                "and data size can be checked, not the run it belongs to nor its data, model and reference",
                ResumeWarning,
                stacklevel=2,
            )
            self._check_config_matches()
            return
        try:
            recorded = json.loads(record_file.read_text())
        except (OSError, ValueError) as err:
            raise RunDirectoryError(
                f"checkpoint {checkpoint}: {RECORD_FILE} is damaged ({err}); resume from an earlier checkpoint"
            ) from None
        folder_id = self._folder_run_id()
        if recorded.get("run_id") != folder_id:
            theirs = recorded.get("run_id")
            where = f"run {folder_id}" if folder_id else f"no {RUN_ID_FILE} file (its run's identity)"
            hint = "copy a run's whole folder to move it, or start a fresh run"
            if folder_id is None:
                hint += f"; if this is that run's folder, write {theirs} into {self.path / RUN_ID_FILE}"
            raise RunDirectoryError(
                f"cannot resume {checkpoint}: it belongs to run {theirs}, but output_dir {self.path} holds {where}: "
                f"a checkpoint continues only the run that wrote it; {hint}"
            )
        current = self.record(step)
        if not self.checks_inputs:
            current["inputs"] = recorded.get("inputs", {})
        changed = record_differences(recorded, current)
        if changed:
            allowed = ", ".join(sorted(RESUMABLE_CHANGES - {"output_dir"}))
            raise RunDirectoryError(
                f"cannot resume {checkpoint}: it continues another run than this one: {'; '.join(changed[:6])}; a "
                f"resumed run may change only {allowed} (and the path of an input it finds unchanged); to train "
                "with these, start a fresh run (another output_dir, or --overwrite-output-dir)"
            )

    def _folder_run_id(self) -> str | None:
        try:
            return (self.path / RUN_ID_FILE).read_text().strip() or None
        except OSError:
            return None

    def _check_inputs(self) -> None:
        """No input the config names (model, data, reward model, critic, ...) is the output folder or lies inside
        what a run there deletes or replaces: its RUN_FILES (the final model among them) and checkpoint-STEP."""
        out = self.path.resolve()
        for name, value in existing_paths(self.settings.input_paths if self.settings else ()):
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

    def _check_not_nested(self) -> None:
        """output_dir does not lie inside a folder grpokit replaces or deletes whole (`replaced_whole_above`)."""
        inside = replaced_whole_above(self.path)
        if inside:
            raise RunDirectoryError(
                f"output_dir {self.path} lies inside {inside}, which grpokit replaces or deletes whole (a final save, "
                "pruning, --overwrite-output-dir): this run would go with it; choose an output_dir outside it"
            )

    def _check_replaced(self) -> None:
        """What the run may replace or delete in its folder is grpokit's own: RUN_FILES names only in a folder a
        grpokit run wrote (`.` may hold a user's `wandb/` or `config.yaml`); `model` (replaced by the final model,
        deleted by `overwrite`) is a model folder grpokit wrote (a run from before PROVENANCE: one with a
        config.json); a checkpoint-STEP folder is a grpokit checkpoint (not another trainer's `checkpoint-500`)."""
        self._check_not_nested()
        kind = written_kind(self.path)
        if kind not in (None, "run"):
            raise RunDirectoryError(
                f"output_dir {self.path} is a {kind} folder grpokit wrote (its {PROVENANCE} says `{kind}`), not a "
                f"run's folder: a run there would write into it and replace it; if it is the {kind} to train from, "
                "give it as an input (`model`) and choose another output_dir"
            )
        found = [n for n in RUN_FILES if (self.path / n).exists() or (self.path / n).is_symlink()]
        if found and not self.holds_grpokit_run():
            raise RunDirectoryError(
                f"output_dir {self.path} holds {', '.join(found[:4])}, which no grpokit run wrote (no {PROVENANCE} or "
                ".lock): a run there would replace or delete them; choose another output_dir"
            )
        model = self.path / "model"
        if not self._legacy_model():
            what = f"output_dir {self.path}: the run's final model path"
            check_replaceable(model, "model", overwrite=True, what=what)
        for child in sorted(self.path.glob("checkpoint-*")):
            if CHECKPOINT_NAME.fullmatch(child.name) and not _is_grpokit_checkpoint(child):
                raise RunDirectoryError(
                    f"output_dir {self.path} holds {child.name}, which grpokit did not write (no {STATE_FILE}): a "
                    "run there would replace or delete it; move it away, or choose another output_dir"
                )

    def _legacy_model(self) -> bool:
        """The folder is a run of a grpokit from before PROVENANCE (its `.lock`, no PROVENANCE of its own) and its
        `model` is that run's final model (a config.json, no PROVENANCE): grpokit's own, though unmarked."""
        model = self.path / "model"
        return (
            self._had_lock
            and written_kind(self.path) is None
            and written_kind(model) is None
            and (model / "config.json").is_file()
        )

    def _mark_legacy_model(self) -> None:
        """Marks such a `model` as the model folder grpokit wrote, once, before the folder is marked as a run (which
        ends `_legacy_model`): the final model then replaces it, and every later run of the folder accepts it."""
        if self._legacy_model():
            from grpokit import __version__

            marker = {"kind": "model", "grpokit": __version__, "marked": "written by an earlier grpokit"}
            (self.path / "model" / PROVENANCE).write_text(json.dumps(marker))

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
        if not saved_file.is_file() or self.settings is None:
            return
        saved = yaml.safe_load(saved_file.read_text()) or {}
        current = self.settings.resolved_config
        defaults = self.settings.defaults
        changed = sorted(
            k
            for k in current.keys() | saved.keys()
            if k not in RESUMABLE_CHANGES and not _same_setting(k, saved, current, defaults)
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
        if not self.path.exists():
            self.plan()  # a resume of a folder that is not there is refused before the folder is made
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
            # checkpoints later than the one resumed stay until it has loaded (`discard_later_checkpoints`)
            with writing(self.path):  # what the folder is: later runs may clear it, `init` never replaces it
                self._mark_legacy_model()
                (self.path / PROVENANCE).write_text(json.dumps({"kind": "run"}))
                self.run_id = self._folder_run_id()
                if self.run_id is None:  # a fresh run, or one resumed from a checkpoint older than run identities
                    self.run_id = uuid.uuid4().hex
                    (self.path / RUN_ID_FILE).write_text(self.run_id + "\n")
        except BaseException:
            self._release()
            raise
        self._install_signal_handlers()
        return self

    def discard_later_checkpoints(self) -> None:
        """After the checkpoint resumed has loaded and passed the stage's own checks: the checkpoints later than
        it belong to a future this run rewrites (metrics.jsonl drops their rows as it reopens), so they go now, and
        never before: a resume that fails leaves every checkpoint where it was."""
        if not self.writer or self.checkpoint is None:
            return
        for later in self._later_checkpoints(self.checkpoint):
            print(f"resuming {self.checkpoint.name}: the later {later.name} goes (its steps are trained again)",
                  file=sys.stderr)  # fmt: skip
            with writing(later):  # one left would be `latest` again: it goes, or the run stops here
                shutil.rmtree(later)

    def _later_checkpoints(self, checkpoint: Path) -> list[Path]:
        step = checkpoint_step(checkpoint)
        return [later for later_step, later in list_checkpoints(self.path) if later_step > step]

    def _check_left_alone(self, checkpoint: Path | None) -> None:
        """Before any work: what this run will delete (a fresh run under overwrite: the earlier run's checkpoints
        and TensorBoard folder; a resume: the checkpoints after the one resumed) holds no file grpokit did not
        write; such a file is named and the run refused."""
        if checkpoint is not None:
            doomed = self._later_checkpoints(checkpoint)
        elif self.overwrite:
            doomed = [p for _, p in list_checkpoints(self.path)] + [self.path / "tensorboard"]
        else:
            return
        for folder in doomed:
            added = foreign_files(folder)
            if added:
                raise RunDirectoryError(
                    f"{'resuming ' + str(checkpoint) if checkpoint else '--overwrite-output-dir'} would delete "
                    f"{folder}, which holds {', '.join(added[:3])}: grpokit did not write them; move them out first"
                )

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
        name = signal.Signals(signum).name
        if self._signalled and LAUNCHER_ENV in os.environ:
            # a cluster signals torchrun and every rank at once, and torchrun forwards its own: each rank gets two
            print(
                f"\n{name} again: still finishing this step (under torchrun a repeated signal does not stop a rank "
                "mid-step; torchrun kills the ranks after its --shutdown-timeout)",
                file=sys.stderr,
                flush=True,
            )
            return
        if self._signalled:  # this process's second one: stop now, as the user asks
            found = list_checkpoints(self.path) if self.writer else []
            kept = (
                f"the newest complete checkpoint is {found[-1][1]} (`--resume-from-checkpoint latest` continues it)"
                if found
                else "no complete checkpoint was written"
            )
            print(
                f"\n{signal.Signals(signum).name} again: stopping at once; {kept}; a checkpoint or model being "
                "written now is left incomplete, never half-replaced",
                file=sys.stderr,
                flush=True,
            )
            self._restore_signal_handlers()
            signal.raise_signal(signum)
            return
        self._signalled = True
        if self.stop_signal is not None:  # another rank's signal, agreed at the last step's end (`run_loop`)
            print(f"\n{name}: this rank is already stopping with the others", file=sys.stderr, flush=True)
            return
        self.stop_signal = signum
        again = (
            "torchrun kills the ranks after its --shutdown-timeout, 30 s unless set: it must cover a step and a "
            "checkpoint; torchrun also sends it when a rank has failed, and then this rank stops without one"
            if LAUNCHER_ENV in os.environ
            else "send it again to stop at once"
        )
        print(f"\n{name}: finishing this step, then writing a checkpoint ({again})", file=sys.stderr, flush=True)

    def save_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        if not self.writer:
            raise RunDirectoryError(f"{self.path} is written by rank 0 alone")
        record = self.record(step)

        def write_with_record(folder: Path) -> None:
            write(folder)
            (folder / RECORD_FILE).write_text(json.dumps(record, indent=1))

        return write_checkpoint(self.path, step, write_with_record, keep=self.keep)

    def check_still_ours(self) -> None:
        """The folder is still there and still locked by this run: one deleted while the run wrote it, or whose
        `.lock` was deleted or replaced (another run may now write there), stops the run by name, not with a raw
        errno or two runs in one folder. Two stats, every step."""
        if not self.writer:
            return
        if not self.path.is_dir():
            raise RunDirectoryError(
                f"output_dir {self.path} was deleted or moved while the run was writing it: the run stops (what "
                "it had written, checkpoints and metrics, went with the folder)"
            )
        if self._lock_file is not None:
            try:
                same = os.stat(self.path / ".lock").st_ino == os.fstat(self._lock_file.fileno()).st_ino
            except OSError:
                same = False
            if not same:
                last = list_checkpoints(self.path)
                kept = f"the last checkpoint is {last[-1][1]}" if last else "no checkpoint was written"
                raise RunDirectoryError(
                    f"{self.path / '.lock'}, this run's lock, was deleted or replaced while it ran: another run may "
                    f"be writing into {self.path} now, so this one stops rather than write into its files; {kept}"
                )

    def checkpoint_due(self, step: int, last_step: int, every: int) -> bool:
        """After the last step, every `every` steps, and when a signal asked to stop (checking first that the folder
        is still this run's: `check_still_ours`)."""
        self.check_still_ours()
        return step == last_step or (every > 0 and step % every == 0) or self.stop_signal is not None

    def check_stop(self, step: int, checkpoint: Path) -> None:
        """After a step's checkpoint: raise TrainingInterrupted if a signal asked to stop."""
        if self.stop_signal is not None:
            raise TrainingInterrupted(self.stop_signal, step, checkpoint)


def _written_after(model: Path, checkpoint: Path) -> bool:
    """`model` exists and was written after `checkpoint` (a run saves its final model after its last checkpoint:
    a model from before it is an earlier run's, left when writing the final one failed)."""

    def written(folder: Path, marker: str) -> float:
        return (folder / marker).stat().st_mtime if (folder / marker).exists() else folder.stat().st_mtime

    return model.is_dir() and written(model, PROVENANCE) >= written(checkpoint, MARKER)


def _is_grpokit_checkpoint(folder: Path) -> bool:
    """Written by `write_checkpoint` (its marker, or its state file when the marker is gone)."""
    return folder.is_dir() and ((folder / MARKER).is_file() or (folder / STATE_FILE).is_file())


def check_not_an_input(input_paths: Iterable[tuple[str, str]], target: str | Path, what: str) -> None:
    """Saving into `target` (`what` names it) replaces no input of the run (`input_paths`, as `RunSettings` holds
    them): not the model trained from (also the KL reference), a reward model, the critic or a data file, nor a
    folder holding one or inside one."""
    target = Path(target).resolve()
    for field, value in existing_paths(input_paths):
        source = Path(value).resolve()
        if source == target or source in target.parents or target in source.parents:
            relation = "is" if source == target else "holds or lies inside"
            raise OutputExistsError(
                f"{what} {str(target)!r} {relation} the run's input `{field}` "
                f"({value}): saving there would replace it; choose another folder"
            )


def existing_paths(input_paths: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (field, path) pairs of `input_paths` that name an existing file or folder, looked up when asked (an input
    may appear or go between the run's set-up and a check)."""
    return [(field, value) for field, value in input_paths if os.path.exists(value)]


def checkpoint_step(folder: Path) -> int:
    match = CHECKPOINT_NAME.fullmatch(Path(folder).name)
    if not match:
        raise RunDirectoryError(f"{folder} is not a checkpoint-STEP folder")
    return int(match.group(1))


def seed_everything(seed: int) -> None:
    """Python's and torch's global RNGs (a stage's own generators are seeded where they are made)."""
    random.seed(seed)
    torch.manual_seed(seed)
