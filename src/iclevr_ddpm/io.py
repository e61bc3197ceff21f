"""Atomic file output and params loading: every output is written to a temporary
file in the same folder and renamed, so a kill never leaves a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from .errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    # through a file object: given a path, torch.save names the zip's inner folder after it,
    # and the random temporary name would make the bytes (and DVC's hash) differ every run
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike) -> Any:
    """Load a tensor/checkpoint file safely (no pickled code) onto the CPU."""
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found" if not Path(path).exists() else f"{path}: not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for empty, truncated or foreign files
        detail = " ".join(str(e).split())[:200]
        detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise UserError(f"{path}: not a PyTorch checkpoint file ({detail})") from e


def load_checkpoint(path: str | os.PathLike, fp: str) -> dict | None:
    """The checkpoint at `path` if it was written under settings `fp`, else None (with a message)."""
    path = Path(path)
    if not path.exists():
        return None
    state = load_torch(path)
    if state.get("fingerprint") != fp:
        print(f"{path}: settings changed since this checkpoint; starting fresh")
        return None
    return state


def save_image(img, path: str | os.PathLike) -> None:
    """Save a PIL image atomically (format from the suffix of `path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """The params file as a dict; run the stages from the project root, where it lives."""
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run from the project root)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of param sections, got {type(params).__name__}")
    return params


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` on success."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
