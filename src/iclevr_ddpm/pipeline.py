"""IclevrPipeline: the trained model as a diffusers DiffusionPipeline (the conditional UNet, a
scheduler and, for latent diffusion, the autoencoder `vae` that decodes). `train` writes it with save_pretrained; from_pretrained loads it in one call,
from local files only.

    pipe = IclevrPipeline.from_pretrained("models/ddpm")
    images = pipe([["red cube", "blue sphere"], ["gray cylinder"]], num_inference_steps=25,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images  # PIL
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin

from . import labels as L
from .autoencoder import decode, downscale
from .data import resize, to_pil, to_uint8
from .diffusion import denoise
from .errors import UserError
from .model import ConditionalUNet

OUTPUT_TYPES = ("pil", "np", "pt")


class ModelFolderError(UserError):
    """A model folder is missing or is not a saved IclevrPipeline."""


# The default classifier-free guidance scale (6: best on val with the object-weighted loss,
# docs/image-quality.md); SampleConfig and the CLI default to it too.
GUIDANCE = 6.0


class IclevrPipeline(DiffusionPipeline):
    """Multi-label iCLEVR scenes from lists of object names ("red cube", ...; 1-3 per image).

    The scheduler saved by `train` is DPM-Solver++ on the training betas (`trained_betas`), so
    `AnyScheduler.from_config(pipe.scheduler.config)` keeps the model's noise schedule.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: ConditionalUNet, scheduler: SchedulerMixin, vae: AutoencoderTiny | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The model's space (B, C, R, R) -> images (B, 3, S, S) in [-1, 1]: pixels are clamped,
        latents decoded."""
        return x.clamp(-1, 1) if self.vae is None else decode(self.vae, x)

    @property
    def image_resolution(self) -> int:
        """Side of the images it draws before any resizing."""
        r = self.unet.config.resolution
        return r if self.vae is None else r * downscale(self.vae)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> IclevrPipeline:
        """Load a folder written by save_pretrained; never the Hub (a missing folder is an error
        naming it, not a failed download)."""
        path = Path(pretrained_model_name_or_path)
        index = path / "model_index.json"
        if not index.is_file():
            what = "model folder not found" if not path.exists() else f"not a saved pipeline (no {index.name})"
            raise ModelFolderError(f"{path}: {what}; expected the folder the train stage writes "
                                   f"(models/ddpm: model_index.json, unet/, scheduler/)")
        try:
            if json.loads(index.read_text()).get("_class_name") != cls.__name__:
                raise ValueError(f"{index.name} names another pipeline class")
            return super().from_pretrained(path, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelFolderError(f"{path}: not a loadable {cls.__name__} ({' '.join(str(e).split())[:300]})") from e

    @torch.no_grad()
    def __call__(self, conditions: list[list[str]] | list[str], num_inference_steps: int = 25,
                 guidance_scale: float = GUIDANCE, guidance_interval=(0.0, 1.0),
                 generator: torch.Generator | list[torch.Generator] | None = None, image_size: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Draw one image per condition (a list of object names, or a list of such lists).

        generator: one CPU generator, or one per image (then batching never changes an image).
        guidance_scale: classifier-free guidance w (1 = none), applied where lo <= t/T <= hi for
        guidance_interval (lo, hi). image_size: output side (default the model's resolution).
        Returns ImagePipelineOutput(images): pil a list of RGB images; np float32 (N, H, W, 3)
        and pt float (N, 3, H, W), both in [0, 1] and equal to the 8-bit images / 255.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type: {output_type!r} unknown; expected one of {list(OUTPUT_TYPES)}")
        conditions = [conditions] if conditions and isinstance(conditions[0], str) else conditions
        for i, names in enumerate(conditions):
            L.check_names(names, "conditions", i)
        gens = self._generators(generator, len(conditions))
        labels = L.multi_hot(conditions).to(self.device)
        x, _ = denoise(self.unet, self.scheduler, labels, gens, num_inference_steps, guidance_scale,
                       interval=guidance_interval, clamp=False)
        u8 = to_uint8(resize(self.to_images(x), image_size or self.image_resolution)).cpu()
        if output_type == "pt":
            images = u8.float() / 255
        elif output_type == "np":
            images = u8.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
        else:
            images = [to_pil(img) for img in u8]
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _generators(generator, n: int) -> list[torch.Generator]:
        if isinstance(generator, list):
            if len(generator) != n:
                raise UserError(f"generator: {len(generator)} generators for {n} conditions; "
                                f"expected one, or one per condition")
            return generator
        if generator is None:  # drawn from torch's global RNG, so torch.manual_seed governs it
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        return [generator] * n  # one stream, drawn image after image
