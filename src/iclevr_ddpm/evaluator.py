"""The ResNet18 multi-label evaluator in the official checkpoint format, its training,
and the official top-k accuracy.

Official format: torchvision resnet18 with fc = Sequential(Linear(512, 24), Sigmoid()),
input (B, 3, 64, 64) in [-1, 1], checkpoint {"model": state_dict}.
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from dvclive import Live
from torch import nn
from torchvision.models import resnet18
from tqdm import tqdm

from .config import check_choice, faster_precision, fingerprint, resolve_device, resolve_precision
from .data import load_processed, resize, to_model_range, to_uint8
from .errors import UserError
from .io import load_checkpoint, load_torch, save_torch
from .labels import NUM_LABELS


@dataclass
class EvaluatorConfig:
    checkpoint: str | None = None  # path to the official checkpoint.pth: used instead of training
    device: str = "auto"
    seed: int = 0
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3              # peak of a warm-up + cosine schedule
    weight_decay: float = 0.05     # decoupled (AdamW)
    ema_decay: float = 0.999      # scored and saved weights: an EMA of the trained ones (0 = off)
    low_res_prob: float = 0.25    # share of batches shrunk to low_res and enlarged back
    low_res: int = 32
    max_shift: float = 0.06       # random translation, fraction of the image
    hflip: bool = False           # mirror images at random (also mirrors the scene's lighting)
    threads: int = 0              # torch CPU threads; 0 = torch's default
    # auto: bf16 on GPUs that have it; on a CPU with native bf16, whichever of bf16 and fp32
    # trains faster, timed at the start (measure_precision) | no | bf16
    mixed_precision: str = "auto"

    def __post_init__(self):
        check_choice("evaluator.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))


def build_evaluator() -> nn.Module:
    """resnet18 with the official multi-label head; outputs probabilities (B, 24) in [0, 1]."""
    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, NUM_LABELS), nn.Sigmoid())
    return model


def load_evaluator(path, device: str = "cpu") -> nn.Module:
    """Load an official-format checkpoint {"model": state_dict} safely onto `device`."""
    state = load_torch(path)
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: expected an evaluator checkpoint {{'model': state_dict}}")
    model = build_evaluator()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # other keys or shapes
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: not a ResNet18 evaluator checkpoint ({first})") from None
    return model.to(device).eval()


def save_evaluator(model: nn.Module, path) -> None:
    # plain (contiguous) tensors, as the official file has, whatever the training layout
    save_torch({"model": {k: v.contiguous() for k, v in model.state_dict().items()}}, path)


def topk_label_hits(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which true labels are among their image's k highest outputs (k = its number of labels).

    probs, labels: (N, 24). Returns bool (N, 24).
    """
    k = labels.sum(1).long()
    order = probs.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(probs.shape[1]).expand_as(order).contiguous())
    return (ranks < k[:, None]) & (labels > 0)


def topk_hits(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, how many of its k highest outputs are true labels. Returns int (N,)."""
    return topk_label_hits(probs, labels).sum(1)


def accuracy_by_shape(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The official metric restricted to the wanted objects of each shape: {shape: hits / wanted}.

    Shapes with no wanted object are left out. probs, labels: (N, 24)."""
    from .labels import COLORS, SHAPES
    hit = topk_label_hits(probs, labels).view(-1, len(SHAPES), len(COLORS)).sum((0, 2))
    wanted = (labels > 0).view(-1, len(SHAPES), len(COLORS)).sum((0, 2))
    return {s: round(h / w, 4) for s, h, w in zip(SHAPES, hit.tolist(), wanted.tolist()) if w}


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Official metric: total top-k hits / total labels over all images scored together."""
    return topk_hits(probs, labels).sum().item() / labels.sum().item()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Probabilities (N, 24) for uint8 images (N, 3, 64, 64)."""
    dev = next(model.parameters()).device
    model.eval()
    out = [model(to_model_range(images[i:i + batch_size]).to(dev)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def augment(x: torch.Tensor, cfg: EvaluatorConfig, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation of a batch (B, 3, 64, 64) in [-1, 1]: optional horizontal
    flip, small translation, and (for a share of batches) the 32 -> 64 round trip that generated
    samples go through. Colours are never changed: they are the labels."""
    b, size = len(x), x.shape[-1]
    if cfg.hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # whole-pixel shifts: a fractional one resamples bilinearly and blurs objects a few
    # pixels wide, which the crisp images to be scored never are
    shift = ((torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.max_shift * size).round()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift * 2 / size  # grid units: the image spans [-1, 1]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if torch.rand(1, generator=gen).item() < cfg.low_res_prob:
        x = resize(resize(x, cfg.low_res), x.shape[-1])
    return x


def heldout_scores(model, images, labels, cfg: EvaluatorConfig) -> dict:
    """Held-out accuracy on crisp images and after the low-res round trip."""
    low = to_uint8(resize(resize(to_model_range(images), cfg.low_res), images.shape[-1]))
    return {"heldout_accuracy": accuracy(predict(model, images), labels),
            "heldout_accuracy_lowres": accuracy(predict(model, low), labels)}


def bce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Mean binary cross-entropy of the model's probabilities on x (B, 3, 64, 64) in [-1, 1]
    against multi-hot y (B, 24); the forward pass in bf16 autocast when `bf16`."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        probs = model(x)
    return F.binary_cross_entropy(probs.float().clamp(1e-6, 1 - 1e-6), y)


def _epoch(model, opt, sched, ema, x_all, y_all, cfg, gen, dev, bf16: bool) -> float:
    """One pass over the shuffled training set; returns the mean BCE loss."""
    model.train()
    order = torch.randperm(len(x_all), generator=gen)
    total, n_batches = 0.0, math.ceil(len(order) / cfg.batch_size)
    for i in tqdm(range(n_batches), desc="evaluator", unit="batch", leave=False):
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        # channels_last: +6% in fp32 on the CPU and what bf16's oneDNN kernels need
        x = augment(to_model_range(x_all[idx]), cfg, gen).to(dev, memory_format=torch.channels_last)
        loss = bce_loss(model, x, y_all[idx].to(dev), bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(model.parameters())
        total += loss.item()
    return total / n_batches


def measure_precision(model, x, y, steps: int = 3) -> tuple[bool, dict]:
    """(use bf16, seconds per step of each) for training `model` on the batch x (B, 3, 64, 64)
    in [-1, 1], y (B, 24), timed on a throwaway copy (config.faster_precision)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)

    def step(bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        bce_loss(model, x, y, bf16).backward()
        opt.step()
    return faster_precision(step, steps)


def _pick_bf16(cfg: EvaluatorConfig, dev: str, model, x_tr, y_tr) -> bool:
    """The precision to train in: as set, or for 'auto' on a bf16-capable CPU as measured."""
    bf16 = resolve_precision(cfg.mixed_precision, dev, cpu_bf16=True) == "bf16"
    if bf16 and cfg.mixed_precision == "auto" and dev == "cpu":
        x = to_model_range(x_tr[:cfg.batch_size]).to(memory_format=torch.channels_last)
        bf16, timing = measure_precision(model, x, y_tr[:cfg.batch_size])
        print(f"evaluator precision: {'bf16' if bf16 else 'fp32'} (seconds per step {timing})")
    return bf16


def _averaged(model: nn.Module, ema: EMAModel | None) -> nn.Module:
    """A copy of `model` with the EMA weights (BatchNorm statistics from `model`); `model` if no EMA."""
    if ema is None:
        return model
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged.parameters())
    return averaged


def _resume(state: dict, model, opt, sched, ema: EMAModel | None, gen: torch.Generator) -> tuple[int, bool | None]:
    """Load a checkpoint's state into the training objects; returns (epochs done, bf16: None in
    checkpoints written before the precision was kept)."""
    model.load_state_dict(state["model"]), opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"]), gen.set_state(state["rng"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return state["epoch"], state.get("bf16")


def train_evaluator(cfg: EvaluatorConfig, data_path, out_path, ckpt_path, live_dir) -> dict:
    """Train on the training split (or copy cfg.checkpoint); report held-out accuracy.

    Resumes from ckpt_path (one checkpoint per epoch) when the settings match.
    """
    x_tr, y_tr = load_processed(data_path, "train")
    x_ho, y_ho = load_processed(data_path, "heldout")
    if cfg.checkpoint:
        model = load_evaluator(cfg.checkpoint)
        shutil.copyfile(cfg.checkpoint, out_path)
        return {"source": str(cfg.checkpoint), **heldout_scores(model, x_ho, y_ho, cfg)}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev, t0 = resolve_device(cfg.device), time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = build_evaluator().to(dev, memory_format=torch.channels_last)
    bf16 = None  # chosen after a resume check: a resumed run keeps the precision it began in
    # fused AdamW and multi-tensor EMA: 5% of a step on 2 cores (benchmarks/bench.py)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps = cfg.epochs * math.ceil(len(x_tr) / cfg.batch_size)
    # linear warm-up for 10% of the steps, then cosine decay to zero
    sched = get_scheduler("cosine", opt, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    # EMA with warm-up (decay 1 - (1 + step)^-2/3, capped): early epochs are not held back
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True,
                   foreach=True) if cfg.ema_decay else None
    gen, epoch, fp = torch.Generator().manual_seed(cfg.seed), 0, fingerprint(asdict(cfg), len(x_tr))
    ckpt = Path(ckpt_path)
    if (state := load_checkpoint(ckpt, fp)) is not None:
        epoch, bf16 = _resume(state, model, opt, sched, ema, gen)
        print(f"{ckpt}: resuming after epoch {epoch}")
    if bf16 is None:
        bf16 = _pick_bf16(cfg, dev, model, x_tr, y_tr)
    live = Live(str(live_dir), resume=epoch > 0, save_dvc_exp=False, dvcyaml=None)
    scores = {}
    while epoch < cfg.epochs:
        loss = _epoch(model, opt, sched, ema, x_tr, y_tr, cfg, gen, dev, bf16)
        epoch += 1
        scores = heldout_scores(_averaged(model, ema), x_ho, y_ho, cfg)
        live.step = epoch
        for name, value in {"loss": loss, **scores}.items():
            live.log_metric(name, value)
        print(f"epoch {epoch}/{cfg.epochs}: loss {loss:.4f}, held-out accuracy "
              f"{scores['heldout_accuracy']:.4f} (low-res {scores['heldout_accuracy_lowres']:.4f})")
        save_torch({"fingerprint": fp, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": gen.get_state(), "bf16": bf16,
                    "ema": ema.state_dict() if ema is not None else None}, ckpt)
    live.end()
    model = _averaged(model, ema)
    save_evaluator(model.cpu(), out_path)
    if not scores:
        scores = heldout_scores(model, x_ho, y_ho, cfg)
    return {"epochs": cfg.epochs, "train_images": len(x_tr), "heldout_images": len(x_ho),
            "precision": "bf16" if bf16 else "fp32",
            "seconds_this_run": round(time.perf_counter() - t0, 1), **scores}


def read_samples(image_dir, n: int, conditions_file="the conditions") -> torch.Tensor:
    """uint8 (n, 3, 64, 64) from image_dir/{i}.png, i = 0..n-1 (the condition file order).

    The folder must hold exactly those n PNGs: one image per condition, none left over."""
    from .data import read_images
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: image folder not found")
    found = sorted(p.name for p in image_dir.glob("*.png"))
    if found != sorted(f"{i}.png" for i in range(n)):
        raise UserError(f"{image_dir}: {len(found)} PNG images, expected {n} named 0.png .. {n - 1}.png "
                        f"(one per condition of {conditions_file})")
    return read_images(image_dir, [f"{i}.png" for i in range(n)], size=64)


def score_folder(evaluator_path, image_dir, conditions_file, device: str = "auto"):
    """Score generated images against their conditions with the official metric.

    Returns (metrics dict, pandas DataFrame with one row per condition).
    """
    import pandas as pd

    from . import labels as L
    conditions = L.load_conditions(conditions_file)
    model = load_evaluator(evaluator_path, resolve_device(device))
    images, wanted = read_samples(image_dir, len(conditions), conditions_file), L.multi_hot(conditions)
    probs = predict(model, images)
    hits = topk_hits(probs, wanted)
    k = wanted.sum(1).long()
    table = pd.DataFrame({
        "index": range(len(conditions)),
        "wanted": [", ".join(c) for c in conditions],
        "predicted_topk": [", ".join(L.NAMES[j] for j in p.argsort(descending=True)[:kk].tolist())
                           for p, kk in zip(probs, k.tolist())],
        "hits": hits.tolist(), "k": k.tolist()})
    metrics = {"accuracy": round(hits.sum().item() / k.sum().item(), 4), "images": len(conditions),
               "labels": int(k.sum()), "hits": int(hits.sum()),
               "by_shape": accuracy_by_shape(probs, wanted)}  # which shapes the samples get wrong
    return metrics, table
