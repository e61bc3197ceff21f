"""The autoencoder of latent diffusion (`model.space: latent`): diffusers' AutoencoderTiny
(TAESD's deterministic conv encoder/decoder, no norms or attention: cheap on a CPU) in a small
config, 64x64x3 <-> 16x16xC. Its training, the latent scaling and the evaluator gate live here;
the UNet and the sampler never see it, only the tensors it makes."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderTiny
from diffusers.optimization import get_scheduler
from dvclive import Live
from tqdm import tqdm

from .config import check_choice, fingerprint, resolve_device
from .data import load_processed, object_mask, to_model_range, to_uint8
from .errors import UserError
from .evaluator import accuracy, load_evaluator, predict
from .io import atomic_dir, load_checkpoint, save_torch


@dataclass
class AutoencoderConfig:
    channels: int = 32             # every level (AutoencoderTiny keeps one width)
    blocks: list = field(default_factory=lambda: [0, 2, 2])  # encoder blocks per level, 64 -> 32 -> 16
    latent_channels: int = 8       # 8 against 4: gate 0.803 / 0.710, UNet val 0.460 / 0.450 at equal minutes;
                                   # more channels lift the gate but cost the UNet (docs/image-quality.md)
    steps: int = 3000              # raising it resumes from the checkpoint
    batch_size: int = 32
    lr: float = 2e-3
    lr_schedule: str = "cosine"    # constant | cosine (to 0 at `steps`): the constant lr's noise
                                   # floor held the gate score at ~0.77 (docs/image-quality.md)
    object_weight: float = 10.0    # extra loss weight on pixels off the local background (objects)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 250
    log_every: int = 10
    gate_images: int = 1000        # held-out images whose reconstructions the evaluator scores
    min_accuracy: float = 0.95     # the gate: evaluator accuracy on those reconstructions

    def __post_init__(self):
        if not self.blocks or any(b < 0 for b in self.blocks):
            raise UserError(f"params.yaml: autoencoder.blocks {self.blocks} must be a non-empty list of "
                            f"block counts >= 0, one per level")
        check_choice("autoencoder.lr_schedule", self.lr_schedule, ("constant", "cosine"))


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderTiny:
    """(B, 3, S, S) in [-1, 1] <-> (B, C, S / 2**(levels - 1), same) latents."""
    levels = len(cfg.blocks)
    return AutoencoderTiny(encoder_block_out_channels=(cfg.channels,) * levels,
                           decoder_block_out_channels=(cfg.channels,) * levels,
                           num_encoder_blocks=tuple(cfg.blocks), num_decoder_blocks=tuple(cfg.blocks[::-1]),
                           latent_channels=cfg.latent_channels)


def downscale(ae: AutoencoderTiny) -> int:
    """Image side / latent side."""
    return 2 ** (len(ae.config.encoder_block_out_channels) - 1)


@torch.no_grad()
def encode(ae: AutoencoderTiny, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (N, 3, S, S) in [-1, 1] -> latents (N, C, S/f, S/f), shifted and scaled to about
    zero mean and unit variance (the config's shift_factor and scaling_factor), as diffusion wants."""
    dev = next(ae.parameters()).device
    z = torch.cat([ae.encode(x[i:i + batch_size].to(dev)).latents.cpu() for i in range(0, len(x), batch_size)])
    return (z - ae.config.shift_factor) * ae.config.scaling_factor


@torch.no_grad()
def decode(ae: AutoencoderTiny, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, s, s) -> images (B, 3, s*f, s*f) in [-1, 1]."""
    z = z.to(next(ae.parameters()).device) / ae.config.scaling_factor + ae.config.shift_factor
    return ae.decode(z).sample.clamp(-1, 1)


def reconstruction_loss(ae: AutoencoderTiny, x: torch.Tensor, object_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE of the round trip of x (B, 3, S, S) in [-1, 1], each pixel weighted 1 +
    object_weight on objects (object_mask): they cover ~1-5% of a frame and carry every label,
    so a plain mean spends the capacity on the floor (their colours came out brown)."""
    rec = ae.decode(ae.encode(x).latents).sample
    w = 1 + object_weight * object_mask(x)
    return (w * ((rec - x).abs() + (rec - x).pow(2))).mean() / w.mean()


def fit_scaling(ae: AutoencoderTiny, x: torch.Tensor) -> None:
    """Set shift_factor and scaling_factor from the raw latents of x (a sample of the training
    images, [-1, 1]) so that encode() gives zero mean and unit variance."""
    ae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    z = encode(ae, x)
    ae.register_to_config(shift_factor=round(z.mean().item(), 5), scaling_factor=round(1 / z.std().item(), 5))


def gate_scores(ae: AutoencoderTiny, evaluator, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Evaluator accuracy on held-out uint8 images (N, 3, S, S) and on their reconstructions."""
    rec = torch.cat([to_uint8(decode(ae, encode(ae, to_model_range(images[i:i + 100])))).cpu()
                     for i in range(0, len(images), 100)])
    return {"heldout_accuracy": round(accuracy(predict(evaluator, images), labels), 4),
            "heldout_accuracy_reconstructed": round(accuracy(predict(evaluator, rec), labels), 4),
            "reconstruction_mse": round((to_model_range(rec) - to_model_range(images)).pow(2).mean().item(), 5)}


def _fit(ae, cfg: AutoencoderConfig, x: torch.Tensor, ckpt: Path, fp: str, live: Live) -> float:
    """Train ae in place on uint8 images x (N, 3, S, S) from the checkpoint's step; seconds spent."""
    acc = Accelerator(cpu=resolve_device(cfg.device) == "cpu")
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
    sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=0, num_training_steps=cfg.steps)
    gen, step = torch.Generator().manual_seed(cfg.seed), 0
    if (state := load_checkpoint(ckpt, fp)) is not None:
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["rng"])
        step = state["step"]
        print(f"{ckpt}: resuming at step {step}")
    model, opt = acc.prepare(ae, opt)
    t0, bar = time.perf_counter(), tqdm(total=cfg.steps, initial=step, desc="autoencoder", unit="step")
    while step < cfg.steps:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        loss = reconstruction_loss(model, to_model_range(x[idx]).to(acc.device), cfg.object_weight)
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            live.step = step
            live.log_metric("loss", loss.item())
            live.log_metric("lr", sched.get_last_lr()[0], plot=False)
            live.make_summary()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_torch({"fingerprint": fp, "step": step, "model": acc.unwrap_model(model).state_dict(),
                        "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                        "rng": gen.get_state()}, ckpt)
    bar.close()
    return time.perf_counter() - t0


def train_autoencoder(cfg: AutoencoderConfig, data_path, evaluator_path, out_dir, ckpt_path, live_dir) -> dict:
    """Train on the training split, fit the latent scaling, check the gate, save out_dir
    (save_pretrained: config.json with the scaling, and the weights). Raises UserError when the
    evaluator scores the held-out reconstructions below cfg.min_accuracy (nothing is saved then,
    the checkpoint is kept: raise autoencoder.steps to train on)."""
    torch.manual_seed(cfg.seed)
    ae = build_autoencoder(cfg)
    x, _ = load_processed(data_path, "train")
    held_x, held_y = load_processed(data_path, "heldout")
    ckpt = Path(ckpt_path)
    fp = fingerprint({k: v for k, v in asdict(cfg).items() if k in ("channels", "blocks", "latent_channels",
                                                                  "batch_size", "lr", "lr_schedule",
                                                                  "object_weight", "seed")},
                     len(x))
    live = Live(str(live_dir), resume=ckpt.exists(), save_dvc_exp=False, dvcyaml=None)
    seconds = _fit(ae, cfg, x, ckpt, fp, live)
    live.end()
    ae = ae.cpu().eval()
    fit_scaling(ae, to_model_range(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:2048]]))
    scores = gate_scores(ae, load_evaluator(evaluator_path), held_x[:cfg.gate_images], held_y[:cfg.gate_images])
    result = {"steps": cfg.steps, "images_seen": cfg.steps * cfg.batch_size, "seconds_this_run": round(seconds, 1),
              "parameters": sum(p.numel() for p in ae.parameters()), **scores,
              "latent_shape": [cfg.latent_channels, x.shape[-1] // downscale(ae), x.shape[-1] // downscale(ae)]}
    if scores["heldout_accuracy_reconstructed"] < cfg.min_accuracy:
        raise UserError(f"{out_dir}: the evaluator scores the autoencoder's held-out reconstructions at "
                        f"{scores['heldout_accuracy_reconstructed']} (originals {scores['heldout_accuracy']}), "
                        f"below autoencoder.min_accuracy {cfg.min_accuracy}; raise autoencoder.steps "
                        f"(training resumes from {ckpt}) or its size")
    with atomic_dir(out_dir) as tmp:
        ae.save_pretrained(tmp)
    return result


def load_autoencoder(path) -> AutoencoderTiny:
    """The autoencoder saved by train_autoencoder, on the CPU in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no saved autoencoder (config.json); expected the folder the "
                        f"train_autoencoder stage writes")
    return AutoencoderTiny.from_pretrained(path, local_files_only=True).eval()
