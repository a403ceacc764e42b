"""Saving models so that a crash never leaves a half-written folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def save_model(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """`save_pretrained` into a temporary sibling, then rename: the folder is whole or absent."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
