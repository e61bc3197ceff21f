"""Sampling with diffusers schedulers and classifier-free guidance; PNGs, grids and a
denoising progression. One seeded generator per image: the batch size never changes
which noise an image gets."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torchvision.utils import make_grid
from tqdm import tqdm

from . import labels as L
from .config import check_choice, resolve_device
from .data import resize, to_uint8
from .diffusion import SAMPLERS, sampler_scheduler
from .io import atomic_dir, save_image
from .model import ConditionalUNet


@dataclass
class SampleConfig:
    sampler: str = "dpmsolver++"   # ddpm | ddim | dpmsolver++ | unipc
    steps: int = 25
    guidance: float = 3.0         # classifier-free guidance scale; 1 = conditional only
    guidance_interval: list = field(default_factory=lambda: [0.0, 1.0])  # t/T where guidance applies
    seed: int = 0
    batch_size: int = 32
    clip: bool = True              # keep x0 estimates in [-1, 1]
    device: str = "auto"
    out_size: int = 64             # samples are resized to this for evaluation
    progression: list = field(default_factory=lambda: ["red sphere", "cyan cylinder", "cyan cube"])
    frames: int = 10               # progression frames, noise to final: at most steps + 1

    def __post_init__(self):
        check_choice("sample.sampler", self.sampler, SAMPLERS)
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"params.yaml: sample.guidance_interval {self.guidance_interval} must be "
                             f"[lo, hi] with 0 <= lo <= hi <= 1 (fractions of the training timesteps)")
        if not 2 <= self.frames <= self.steps + 1:
            raise ValueError(f"params.yaml: sample.frames {self.frames} must be between 2 and "
                             f"sample.steps + 1 = {self.steps + 1}")


def _guided(model, x, t, labels, guidance: float):
    """Model output with classifier-free guidance: u + w (c - u) (Ho & Salimans 2022)."""
    if guidance == 1.0:
        return model(x, t.expand(len(x)), labels)
    both = model(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([labels, torch.zeros_like(labels)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def denoise(model, scheduler, labels: torch.Tensor, generators: list[torch.Generator], steps: int,
            guidance: float = 1.0, frames: int = 0, interval=(0.0, 1.0)):
    """Run the reverse process for one batch.

    labels: (B, 24); generators: one per image (CPU). Guidance applies only at timesteps t with
    lo <= t / T <= hi, interval = (lo, hi) (Kynkaanniemi et al. 2024: guidance at every noise
    level costs diversity and, at high noise, layout). Returns the final x0 (B, 3, R, R)
    in [-1, 1] and, if frames > 0, a list of `frames` intermediate x_t from noise to the end.
    """
    dev, res = labels.device, model.config.resolution
    x = torch.cat([torch.randn((1, 3, res, res), generator=g) for g in generators]).to(dev)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=dev)  # also resets multistep solver state
    keep = set(torch.linspace(0, steps, frames).round().long().tolist()) if frames else set()
    history = [x.clone()] if 0 in keep else []
    # stochastic samplers (DDPM) draw their step noise from the per-image generators too
    step_kw = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    lo, hi = (v * scheduler.config.num_train_timesteps for v in interval)
    for i, t in enumerate(scheduler.timesteps):
        w = guidance if lo <= t.item() <= hi else 1.0
        out = _guided(model, scheduler.scale_model_input(x, t), t.reshape(1).to(dev), labels, w)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
        if i + 1 in keep:
            history.append(x.clone())
    return x.clamp(-1, 1), history


def load_model(model_dir, device: str = "auto") -> ConditionalUNet:
    return ConditionalUNet.from_pretrained(model_dir).to(resolve_device(device)).eval()


def generate(model, scheduler, conditions: list[list[str]], cfg: SampleConfig) -> torch.Tensor:
    """uint8 (N, 3, out_size, out_size) for each condition list, in order."""
    dev = next(model.parameters()).device
    labels = L.multi_hot(conditions).to(dev)
    out = []
    for start in tqdm(range(0, len(conditions), cfg.batch_size), desc="sample", unit="batch"):
        gens = [torch.Generator().manual_seed(cfg.seed + i)
                for i in range(start, min(start + cfg.batch_size, len(conditions)))]
        x, _ = denoise(model, scheduler, labels[start:start + len(gens)], gens, cfg.steps, cfg.guidance,
                       interval=cfg.guidance_interval)
        out.append(to_uint8(resize(x, cfg.out_size)).cpu())
    return torch.cat(out)


def progression(model, scheduler, names: list[str], cfg: SampleConfig) -> torch.Tensor:
    """uint8 (3, H, W) strip of cfg.frames images from pure noise to the final sample."""
    L.check_names(names, "params.yaml", "sample.progression")
    dev = next(model.parameters()).device
    _, hist = denoise(model, scheduler, L.multi_hot([names]).to(dev), [torch.Generator().manual_seed(cfg.seed)],
                      cfg.steps, cfg.guidance, frames=cfg.frames, interval=cfg.guidance_interval)
    frames = to_uint8(resize(torch.cat(hist).clamp(-1, 1), cfg.out_size)).cpu()
    return make_grid(frames, nrow=len(frames), padding=2, pad_value=255)


def to_pil(img: torch.Tensor):
    from PIL import Image
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def load_sampler(model_dir, cfg: SampleConfig):
    """The trained model and the configured sampler built from its saved noise schedule."""
    model = load_model(model_dir, cfg.device)
    train_sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return model, sampler_scheduler(cfg.sampler, train_sched, cfg.clip)


def sample_split(model_dir, conditions_file, out_dir, cfg: SampleConfig, grid_path=None,
                 progression_path=None) -> torch.Tensor:
    """Sample every condition of `conditions_file` into out_dir/{i}.png (64x64, file order),
    plus an 8-per-row grid and a progression image. Usable outside the pipeline."""
    conditions = L.load_conditions(conditions_file)
    model, sched = load_sampler(model_dir, cfg)
    images = generate(model, sched, conditions, cfg)
    with atomic_dir(out_dir) as tmp:
        for i, img in enumerate(images):
            to_pil(img).save(Path(tmp) / f"{i}.png")
    if grid_path:
        save_image(to_pil(make_grid(images, nrow=8, padding=2, pad_value=255)), grid_path)
    if progression_path:
        save_image(to_pil(progression(model, sched, cfg.progression, cfg)), progression_path)
    return images
