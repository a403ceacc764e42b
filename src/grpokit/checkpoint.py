"""Saving models so that a crash never leaves a half-written folder behind."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write into; on success it replaces `path`, so the
    folder is whole or absent (an error leaves the previous `path` untouched)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def save_model(model: Any, tokenizer: Any, path: str | Path, *, state_dict: dict | None = None) -> Path:
    """`save_pretrained` (weights from `state_dict` when given) and the tokenizer, atomically."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return Path(path)
