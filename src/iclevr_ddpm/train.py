"""Training loop for the conditional DDPM: accelerate (CPU, one or many GPUs, mixed
precision), diffusers EMA and LR schedules, dvclive logging, atomic checkpoints and
exact resume after a kill."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from dvclive import Live
from tqdm import tqdm

from .config import PRECISIONS, check_choice, fingerprint, resolve_device, resolve_precision
from .data import load_processed, resize, to_model_range
from .diffusion import diffusion_loss, noise_scheduler
from .io import atomic_dir, load_checkpoint, save_torch
from .model import ConditionalUNet

LR_SCHEDULES = ("constant", "cosine", "cosine_warmup")


@dataclass
class TrainConfig:
    device: str = "auto"          # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16/fp16 on CUDA, none on CPU) | no | fp16 | bf16
    seed: int = 0
    batch_size: int = 32
    max_steps: int = 4000
    lr: float = 1e-3
    lr_schedule: str = "cosine_warmup"
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1          # label dropout for classifier-free guidance
    snr_gamma: float = 5.0         # min-SNR loss weighting; 0 turns it off
    checkpoint_every: int = 250
    log_every: int = 10

    def __post_init__(self):
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("train.mixed_precision", self.mixed_precision, PRECISIONS)


def _accelerator(cfg: TrainConfig) -> Accelerator:
    # CPU bf16 gains only ~11% for the UNet here (docs/cpu-sizing.md): auto keeps fp32 there
    device = resolve_device(cfg.device)
    return Accelerator(cpu=device == "cpu", mixed_precision=resolve_precision(cfg.mixed_precision, device))


def _lr_scheduler(cfg: TrainConfig, opt):
    name = {"constant": "constant", "cosine": "cosine", "cosine_warmup": "cosine"}[cfg.lr_schedule]
    warmup = cfg.warmup_steps if cfg.lr_schedule == "cosine_warmup" else 0
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)


class Run:
    """Everything a checkpoint holds: model, EMA, optimizer, LR schedule, step and RNG."""

    def __init__(self, cfg: TrainConfig, model_kw: dict, seed_offset: int = 0):
        self.model = ConditionalUNet(**model_kw)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True,
                            model_cls=ConditionalUNet, model_config=self.model.config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_sched = _lr_scheduler(cfg, self.opt)
        self.gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
        self.step = 0

    def state(self, fp: str) -> dict:
        return {"fingerprint": fp, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict(), "rng": self.gen.get_state()}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        self.gen.set_state(state["rng"])
        self.step = state["step"]


def train_step(acc: Accelerator, model, opt, run: Run, noise, x_all: torch.Tensor, labels: torch.Tensor,
               cfg: TrainConfig) -> float:
    """One optimisation step on a random batch of x_all (N, 3, R, R) in [-1, 1]; returns the loss."""
    idx = torch.randint(len(x_all), (cfg.batch_size,), generator=run.gen)
    x0, y = x_all[idx].to(acc.device), labels[idx].clone()
    y[torch.rand(len(y), generator=run.gen) < cfg.p_uncond] = 0.0  # label dropout -> null condition
    with acc.autocast():
        loss = diffusion_loss(model, noise, x0, y.to(acc.device), cfg.snr_gamma, run.gen)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} at step {run.step + 1}; "
                                 f"try a lower train.lr or train.grad_clip")
    acc.backward(loss)
    if cfg.grad_clip:
        acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    run.lr_sched.step()
    opt.zero_grad(set_to_none=True)
    run.ema.step(acc.unwrap_model(model).parameters())
    run.step += 1
    return loss.item()


def train(cfg: TrainConfig, model_kw: dict, diffusion_kw: dict, schedule: str, data_path,
          out_dir, ckpt_dir, live_dir) -> dict:
    """Train from the tensor file; write the EMA model to out_dir (save_pretrained).

    Returns the final figures (steps, images seen, wall time, images/s, parameters).
    """
    acc = _accelerator(cfg)
    set_seed(cfg.seed)  # same initial weights on every process and every run
    noise = noise_scheduler(schedule, **diffusion_kw)
    images, labels = load_processed(data_path, "train")
    run = Run(cfg, model_kw, seed_offset=acc.process_index)
    x_all = resize(to_model_range(images), run.model.config.resolution)  # once, in memory
    ckpt = Path(ckpt_dir) / f"checkpoint-{acc.process_index}.pt"
    run_settings = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "log_every")}
    fp = fingerprint(run_settings, model_kw, diffusion_kw, schedule, acc.num_processes, len(images))
    state = load_checkpoint(ckpt, fp)
    if resumed := state is not None:
        run.load(state)
        print(f"{ckpt}: resuming at step {run.step}")
    # The LR schedule is not prepared: accelerate would step it once per process, and every
    # process here runs all max_steps (each draws its own batches).
    model, opt = acc.prepare(run.model, run.opt)
    run.ema.to(acc.device)
    live = Live(str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None) if acc.is_main_process else None
    n_params = sum(p.numel() for p in run.model.parameters())
    t0, start, loss_avg = time.perf_counter(), run.step, math.nan
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", disable=not acc.is_main_process)
    while run.step < cfg.max_steps:
        loss = train_step(acc, model, opt, run, noise, x_all, labels, cfg)
        loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
        rate = (run.step - start) * cfg.batch_size * acc.num_processes / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{rate:.0f}", refresh=False)
        if run.step % cfg.log_every == 0 and live is not None:
            live.step = run.step
            for name, value in {"loss": loss, "loss_smooth": loss_avg, "lr": run.lr_sched.get_last_lr()[0],
                                "images_per_second": rate}.items():
                live.log_metric(name, value)
            live.make_summary()
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps:
            save_torch(run.state(fp), ckpt)
    bar.close()
    seconds = time.perf_counter() - t0
    if acc.is_main_process:
        final = ConditionalUNet.from_config(run.model.config)
        run.ema.copy_to(final.parameters())
        with atomic_dir(out_dir) as tmp:
            final.save_pretrained(tmp)
            noise.save_pretrained(Path(tmp) / "scheduler")  # sampling rebuilds the schedule from it
    if live is not None:
        live.end()
    return {"steps": run.step, "steps_this_run": run.step - start,
            "images_seen": run.step * cfg.batch_size * acc.num_processes,
            "wall_seconds": round(seconds, 1),
            "images_per_second": round((run.step - start) * cfg.batch_size * acc.num_processes / max(seconds, 1e-9), 1),
            "parameters": n_params, "loss_smooth": round(loss_avg, 5)}
