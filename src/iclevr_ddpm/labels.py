"""The 24 iCLEVR labels (one place): official order, name <-> index, multi-hot,
and validated loading of objects.json, train.json and condition files.

Official order: index = shape * 8 + colour with shapes cube, sphere, cylinder and
colours gray, red, blue, green, brown, purple, cyan, yellow.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import torch

from .errors import UserError

SHAPES = ("cube", "sphere", "cylinder")
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)
INDEX = {name: i for i, name in enumerate(NAMES)}
NUM_LABELS = len(NAMES)
MAX_OBJECTS = 3


class LabelFileError(UserError):
    """A label or condition file is malformed; the message names file, entry and value."""


def name_of(shape: int, color: int) -> str:
    return NAMES[shape * len(COLORS) + color]


def _fail(path, entry, msg: str):
    where = f"{path}" if entry is None else f"{path}: entry {entry}"
    raise LabelFileError(f"{where}: {msg}")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LabelFileError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}: invalid JSON ({e})") from None


def check_names(names, path, entry, index=INDEX, max_objects: int = MAX_OBJECTS) -> list[str]:
    """Validate one list of object names; return it. Raise LabelFileError otherwise."""
    if not isinstance(names, list):
        _fail(path, entry, f"expected a list of object names, got {type(names).__name__} {names!r}")
    if not names:
        _fail(path, entry, f"empty list: expected 1 to {max_objects} object names")
    if len(names) > max_objects:
        _fail(path, entry, f"{len(names)} objects {names}: at most {max_objects} allowed")
    for name in names:
        if not isinstance(name, str) or name not in index:
            close = difflib.get_close_matches(str(name), list(index), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(path, entry, f"unknown object name {name!r}{hint}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail(path, entry, f"repeated object {dup[0]!r} in {names}")
    return names


def load_objects(path: str | os.PathLike) -> dict[str, int]:
    """Read objects.json (name -> index) and check it is the official 24-label map."""
    data = _read_json(path)
    if not isinstance(data, dict):
        _fail(path, None, f"expected a JSON object name -> index, got {type(data).__name__}")
    for name, idx in data.items():
        if INDEX.get(name) != idx:
            want = INDEX.get(name, "no such label")
            _fail(path, repr(name), f"index {idx!r}, expected {want} (official iCLEVR order)")
    if len(data) != NUM_LABELS:
        missing = [n for n in NAMES if n not in data]
        _fail(path, None, f"{len(data)} labels, expected {NUM_LABELS}; missing {missing}")
    return data


def load_train_labels(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read train.json: image file name -> list of object names."""
    data = _read_json(path)
    if not isinstance(data, dict):
        _fail(path, None, f"expected a JSON object file -> names, got {type(data).__name__}")
    for i, (fname, names) in enumerate(data.items()):
        check_names(names, path, f"{i} ({fname})")
    return data


def load_conditions(path: str | os.PathLike) -> list[list[str]]:
    """Read a condition file like test.json: a list of object-name lists."""
    data = _read_json(path)
    if not isinstance(data, list):
        _fail(path, None, f"expected a JSON list of object-name lists, got {type(data).__name__}")
    for i, names in enumerate(data):
        check_names(names, path, i)
    return data


def multi_hot(names_list: list[list[str]]) -> torch.Tensor:
    """Encode lists of names as a float tensor (N, 24) with values in {0, 1}."""
    out = torch.zeros(len(names_list), NUM_LABELS)
    for i, names in enumerate(names_list):
        out[i, [INDEX[n] for n in names]] = 1.0
    return out


def decode(vector: torch.Tensor) -> list[str]:
    """Names of the labels set in one multi-hot vector (24,)."""
    return [NAMES[i] for i in vector.nonzero().flatten().tolist()]


def write_objects(path: str | os.PathLike) -> None:
    from .io import save_json
    save_json(dict(INDEX), Path(path))
