"""Sampling with diffusers schedulers and classifier-free guidance; PNGs, grids and a
denoising progression. One seeded generator per image: the batch size never changes
which noise an image gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from . import labels as L
from .config import check_choice, resolve_device
from .data import resize, to_pil, to_uint8
from .diffusion import SAMPLERS, denoise, sampler_scheduler
from .errors import UserError
from .io import atomic_dir, save_image
from .pipeline import GUIDANCE, IclevrPipeline


@dataclass
class SampleConfig:
    sampler: str = "dpmsolver++"   # ddpm | ddim | dpmsolver++ | sde-dpmsolver++ | unipc
    steps: int = 25
    guidance: float = GUIDANCE    # classifier-free guidance scale; 1 = conditional only
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
            raise UserError(f"params.yaml: sample.guidance_interval {self.guidance_interval} must be "
                             f"[lo, hi] with 0 <= lo <= hi <= 1 (fractions of the training timesteps)")
        if not 2 <= self.frames <= self.steps + 1:
            raise UserError(f"params.yaml: sample.frames {self.frames} must be between 2 and "
                             f"sample.steps + 1 = {self.steps + 1}")


def load_pipeline(model_dir, cfg: SampleConfig) -> IclevrPipeline:
    """The saved pipeline on cfg.device, its scheduler swapped for cfg.sampler (built from the
    saved training betas, so every schedule works with every sampler). cfg.clip keeps pixel
    x0 estimates in [-1, 1]; latents are never clipped."""
    pipe = IclevrPipeline.from_pretrained(model_dir).to(resolve_device(cfg.device))
    pipe.scheduler = sampler_scheduler(cfg.sampler, pipe.scheduler, cfg.clip and pipe.vae is None)
    return pipe


def generate(pipe: IclevrPipeline, conditions: list[list[str]], cfg: SampleConfig) -> torch.Tensor:
    """uint8 (N, 3, out_size, out_size) for each condition list, in order; image i always
    gets the noise of generator seed cfg.seed + i, whatever the batch size."""
    out = []
    for start in tqdm(range(0, len(conditions), cfg.batch_size), desc="sample", unit="batch"):
        batch = conditions[start:start + cfg.batch_size]
        gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(batch))]
        images = pipe(batch, cfg.steps, cfg.guidance, cfg.guidance_interval, generator=gens,
                      image_size=cfg.out_size, output_type="pt").images
        out.append((images * 255).round().to(torch.uint8))  # exact: the pipeline's images are 8-bit / 255
    return torch.cat(out)


def progression(pipe: IclevrPipeline, names: list[str], cfg: SampleConfig) -> torch.Tensor:
    """uint8 (3, H, W) strip of cfg.frames images from pure noise to the final sample."""
    L.check_names(names, "params.yaml", "sample.progression")
    labels = L.multi_hot([names]).to(pipe.device)
    _, hist = denoise(pipe.unet, pipe.scheduler, labels, [torch.Generator().manual_seed(cfg.seed)],
                      cfg.steps, cfg.guidance, frames=cfg.frames, interval=cfg.guidance_interval, clamp=False)
    frames = to_uint8(resize(pipe.to_images(torch.cat(hist)), cfg.out_size)).cpu()
    return make_grid(frames, nrow=len(frames), padding=2, pad_value=255)


def sample_conditions(pipe: IclevrPipeline, conditions: list[list[str]], out_dir, cfg: SampleConfig,
                      grid_path=None, progression_path=None) -> torch.Tensor:
    """Sample each condition into out_dir/{i}.png (in order; the folder is replaced whole),
    plus optionally an 8-per-row grid and a progression image. Returns the uint8 images."""
    images = generate(pipe, conditions, cfg)
    with atomic_dir(out_dir) as tmp:
        for i, img in enumerate(images):
            to_pil(img).save(Path(tmp) / f"{i}.png")
    if grid_path:
        save_image(to_pil(make_grid(images, nrow=8, padding=2, pad_value=255)), grid_path)
    if progression_path:
        save_image(to_pil(progression(pipe, cfg.progression, cfg)), progression_path)
    return images


def sample_split(model_dir, conditions_file, out_dir, cfg: SampleConfig, grid_path=None,
                 progression_path=None) -> torch.Tensor:
    """sample_conditions for every condition of `conditions_file` with the model in model_dir."""
    conditions = L.load_conditions(conditions_file)
    return sample_conditions(load_pipeline(model_dir, cfg), conditions, out_dir, cfg, grid_path, progression_path)
