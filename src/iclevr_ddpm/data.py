"""Preprocess an iCLEVR folder (synthetic or real) into one tensor file, and load it.

Raw layout (the real data set's, and what `render` writes):
    <raw_dir>/objects.json, train.json, test.json, new_test.json, images/<file>.png
    (or iclevr/<file>.png, as the course archive names the folder)
Tensor file: {"images": uint8 (N, 3, 64, 64), "labels": float (N, 24) in {0, 1},
              "files": list[str], "heldout": bool (N,)}.
Condition files written beside it: test.json, new_test.json (validated copies) and
val.json, the label lists of held-out images that settings are tuned on.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import labels as L
from .errors import UserError
from .io import load_torch, save_json, save_torch

CONDITION_SPLITS = ("test", "new_test")


class DataError(UserError):
    """The raw data folder is incomplete or holds unreadable images."""


def load_image(path: str | os.PathLike, size: int = 64) -> np.ndarray:
    """Decode one image of any size/mode into uint8 (size, size, 3), antialiased resize."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(im)


def read_images(image_dir: Path, files: list[str], size: int = 64) -> torch.Tensor:
    """All images as uint8 (N, 3, size, size); every bad file is reported in one DataError."""
    out = np.empty((len(files), size, size, 3), np.uint8)
    bad = []
    for i, name in enumerate(tqdm(files, desc="preprocess", unit="img")):
        try:
            out[i] = load_image(image_dir / name, size)
        except FileNotFoundError:
            bad.append(f"{name}: missing")
        except Exception as e:  # PIL raises several types for truncated/corrupt files
            bad.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{image_dir}: {len(bad)} of {len(files)} images failed:\n  {shown}")
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def image_dir(raw: Path) -> Path:
    """The images folder of a raw folder: `images/` (what render writes) or `iclevr/` (the
    course archive's name for it)."""
    for name in ("images", "iclevr"):
        if (raw / name).is_dir():
            return raw / name
    raise DataError(f"{raw}: no images folder: expected {raw / 'images'} or {raw / 'iclevr'}")


def heldout_mask(files: list[str], fraction: float, seed: int) -> torch.Tensor:
    """Seeded held-out split by scene (the `_k` images of one scene stay together)."""
    scenes = sorted({f.rsplit("_", 1)[0] for f in files})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(scenes, int(round(fraction * len(scenes))), replace=False).tolist())
    return torch.tensor([f.rsplit("_", 1)[0] in chosen for f in files])


def val_split(files: list[str], lab: torch.Tensor, heldout: torch.Tensor, size: int,
              seed: int) -> tuple[list[list[str]], list[str]]:
    """`size` label lists (1-3 objects each) of seeded held-out images: the `val` condition split.

    Its scenes are never trained on, by the DDPM or the evaluator. Returns the conditions
    (in the format of test.json) and the files they were read from; fewer than `size`
    when fewer images are held out.
    """
    pool = heldout.nonzero().flatten().numpy()
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(pool, min(size, len(pool)), replace=False).tolist())
    return [L.decode(lab[i]) for i in chosen], [files[i] for i in chosen]


def statistics(lab: torch.Tensor, heldout: torch.Tensor) -> dict:
    """Data-set figures for metrics/data.json."""
    per_image = Counter(lab.sum(1).int().tolist())
    return {"images": len(lab), "train_images": int((~heldout).sum()),
            "heldout_images": int(heldout.sum()),
            "objects_per_image": {str(k): per_image[k] for k in sorted(per_image)},
            "count_per_label": dict(zip(L.NAMES, lab.sum(0).int().tolist()))}


def preprocess(raw_dir, out_file, conditions_dir, size: int = 64, heldout_fraction: float = 0.05,
               seed: int = 0, val_size: int = 256) -> dict:
    """Validate raw_dir and write the tensor file and the condition files (test, new_test, val).

    Returns the statistics dict. Raises LabelFileError / DataError naming the bad entry.
    """
    raw, t0 = Path(raw_dir), time.perf_counter()
    if not raw.is_dir():
        raise DataError(f"{raw}: raw data folder not found (see data.raw_dir in params.yaml)")
    L.load_objects(raw / "objects.json")
    train = L.load_train_labels(raw / "train.json")
    conditions = {s: L.load_conditions(raw / f"{s}.json") for s in CONDITION_SPLITS}
    files = sorted(train)
    images = read_images(image_dir(raw), files, size)
    lab = L.multi_hot([train[f] for f in files])
    held = heldout_mask(files, heldout_fraction, seed)
    save_torch({"images": images, "labels": lab, "files": files, "heldout": held}, out_file)
    conditions["val"], _ = val_split(files, lab, held, val_size, seed)
    for split, conds in conditions.items():
        save_json(conds, Path(conditions_dir) / f"{split}.json")
    stats = statistics(lab, held)
    stats["val_conditions"] = len(conditions["val"])
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    return stats


def load_processed(path, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, H, W) and labels float (N, 24) of split 'all', 'train' or 'heldout'."""
    d = load_torch(path)
    if split == "all":
        return d["images"], d["labels"]
    mask = d["heldout"] if split == "heldout" else ~d["heldout"]
    return d["images"][mask], d["labels"][mask]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> an RGB PIL image."""
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images (B, 3, H, W) in [-1, 1]: area when shrinking, bicubic when enlarging."""
    if x.shape[-1] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    up = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)


def object_mask(x: torch.Tensor, radius: int = 7, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, S, S) in {0, 1}: pixels of x (B, 3, S, S) in [-1, 1] that differ from the local
    background (a (2r+1)^2 box mean, which objects a few pixels wide barely move) by > threshold
    in some channel: the objects, their edges and shadows. The box mean is taken as a row mean
    then a column mean (separable: 2k instead of k^2 adds per pixel, 2.6x faster at k = 15, the
    same mask: it runs on every training batch)."""
    k = 2 * radius + 1
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    bg = F.avg_pool2d(F.avg_pool2d(padded, (1, k), stride=1), (k, 1), stride=1)
    return ((x - bg).abs().amax(1, keepdim=True) > threshold).to(x.dtype)
