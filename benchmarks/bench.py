"""Benchmarks (not tests): print throughput figures on this machine.

    python benchmarks/bench.py [TENSOR_FILE RAW_DIR]

1. Training images/s of the DDPM (its steps with the plain AdamW loop, comparable across days):
   the `cpu` preset in fp32, channels_last, bf16 autocast and torch.compile; `cpu_patch` (the
   default) at batch 32, and at the default batch 8 in fp32 and bf16; `cpu_latent` on 16x16x4
   latents; the `report` preset; the autoencoder of latent diffusion (params.yaml's
   `autoencoder` config).
2. Training images/s of the ResNet18 evaluator: fp32, channels_last, and with bf16 autocast.
   Milliseconds of the weight update after each step (AdamW and EMA), as a Python loop over the
   tensors and as the fused / multi-tensor kernels that `train` and `train_evaluator` use.
3. Loading the preprocessed tensor file vs decoding PNGs with PIL per item.
"""
import sys
import time

import torch
from diffusers.training_utils import EMAModel

from iclevr_ddpm.autoencoder import AutoencoderConfig, build_autoencoder, reconstruction_loss
from iclevr_ddpm.data import load_image, to_model_range
from iclevr_ddpm.io import load_torch
from iclevr_ddpm.diffusion import diffusion_loss, noise_scheduler
from iclevr_ddpm.evaluator import bce_loss, build_evaluator
from iclevr_ddpm.labels import NUM_LABELS
from iclevr_ddpm.model import ConditionalUNet, exact_attention, model_kwargs


def _steps_rate(loss_fn, model, lr: float, batch: int, steps: int, warmup: int) -> float:
    """Images/s of `steps` AdamW steps on loss_fn() after `warmup` untimed ones."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def train_rate(preset: str, batch: int, steps: int, channels_last: bool = False, bf16: bool = False,
               compiled: bool = False, **overrides) -> float:
    """DDPM training images/s; optionally channels_last, bf16 autocast, torch.compile (its
    compilation is in the untimed warm-up steps). overrides: model fields (AdaGN unless given)."""
    model = ConditionalUNet(**model_kwargs({"preset": preset, "conditioning": "scale_shift", **overrides}))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compiled else model
    res, in_channels, sched = model.config.resolution, model.config.in_channels, noise_scheduler("cosine")
    x, y = (torch.rand(batch, in_channels, res, res) * 2 - 1).contiguous(memory_format=fmt), torch.zeros(batch, NUM_LABELS)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), exact_attention(x.device):
            return diffusion_loss(net, sched, x, y)  # as train_step
    rate = _steps_rate(loss, model, 1e-4, batch, steps, warmup=3 if compiled else 1)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    patch = f" patch {model.config.patch_size}" if model.config.patch_size > 1 else ""
    print(f"train {preset:10s} {n:6.1f}M params {res}x{res}x{in_channels}{patch} batch {batch} channels_last={channels_last!s:5} "
          f"bf16={bf16!s:5} compile={compiled!s:5}: {rate:7.1f} images/s")
    return rate


def autoencoder_rate(batch: int = 32, steps: int = 10) -> float:
    """Training images/s of the autoencoder in params.yaml's default config (64x64 images)."""
    cfg = AutoencoderConfig()
    ae = build_autoencoder(cfg)
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    rate = _steps_rate(lambda: reconstruction_loss(ae, x, cfg.object_weight), ae, 1e-3, batch, steps, warmup=1)
    n = sum(p.numel() for p in ae.parameters()) / 1e6
    print(f"autoencoder {n:.2f}M params channels {cfg.channels} blocks {cfg.blocks} "
          f"latent {cfg.latent_channels}: {rate:6.1f} images/s")
    return rate


def evaluator_rate(channels_last: bool, bf16: bool, batch: int = 64, steps: int = 8) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_evaluator().to(memory_format=fmt)
    x, y = torch.rand(batch, 3, 64, 64).to(memory_format=fmt) * 2 - 1, torch.zeros(batch, NUM_LABELS)
    # the train_evaluator step
    rate = _steps_rate(lambda: bce_loss(model, x, y, bf16), model, 1e-3, batch, steps, warmup=2)
    print(f"evaluator batch {batch} channels_last={channels_last!s:5} bf16={bf16!s:5}: {rate:6.1f} images/s")
    return rate


def update_ms(name: str, model: torch.nn.Module, fast: bool, steps: int = 20) -> float:
    """Milliseconds of one AdamW step plus one EMA step on `model`'s parameters (random
    gradients): the for-loop kernels, or fused AdamW and foreach EMA when `fast`."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fast or None)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, foreach=fast)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        opt.step()
        ema.step(params)
    ms = 1000 * (time.perf_counter() - t0) / steps
    print(f"update {name:10s} {sum(p.numel() for p in params) / 1e6:5.1f}M params in {len(params)} tensors "
          f"fused={fast!s:5}: {ms:6.1f} ms per step (AdamW + EMA)")
    return ms


def loading(tensor_file: str, raw_dir: str, n: int = 3000) -> None:
    t0 = time.perf_counter()
    d = load_torch(tensor_file)
    images, labels, files = d["images"], d["labels"], d["files"]
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in torch.randperm(len(images))[:n].tolist():  # a Dataset __getitem__ over the tensor
        _ = to_model_range(images[i]), labels[i]
    t_tensor = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files[:n]:  # a seed-style Dataset: decode each PNG with PIL per item
        _ = to_model_range(torch.from_numpy(load_image(f"{raw_dir}/images/{f}").copy()).permute(2, 0, 1))
    t_png = time.perf_counter() - t0
    print(f"tensor file: loaded {len(images)} images in {t_load:.2f} s ({len(images) / t_load:,.0f} images/s); "
          f"per-item access {n / t_tensor:,.0f} images/s")
    print(f"PNG + PIL per item: {n / t_png:,.0f} images/s")


if __name__ == "__main__":
    torch.manual_seed(0)
    for cl, bf16, compiled in ((False, False, False), (True, False, False), (False, True, False),
                               (False, False, True)):
        train_rate("cpu", 32, 25, cl, bf16, compiled)
    train_rate("cpu_latent", 32, 25, in_channels=4)
    train_rate("cpu_patch", 32, 25)  # 64x64 pixels folded into 2x2 patches
    for bf16 in (False, True):  # the default's batch: train.mixed_precision auto takes the faster
        train_rate("cpu_patch", 8, 60, bf16=bf16, label_features="attributes")
    train_rate("cpu_latent", 32, 25, resolution=64, patch_size=4)
    autoencoder_rate()
    train_rate("report", 4, 3)
    for fmt, bf16 in ((False, False), (True, False), (True, True)):
        evaluator_rate(fmt, bf16)
    for fast in (False, True):
        update_ms("cpu_patch", ConditionalUNet(**model_kwargs({"preset": "cpu_patch", "conditioning": "scale_shift"})), fast)
        update_ms("evaluator", build_evaluator(), fast)
    if len(sys.argv) == 3:
        loading(*sys.argv[1:])
