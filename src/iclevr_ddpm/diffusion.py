"""The noise process: training schedules, the diffusion loss, the samplers' schedulers (all
diffusers objects configured from params) and the reverse process with guidance."""
from __future__ import annotations

import inspect

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)

from .config import check_choice
from .data import object_mask
from .errors import UserError

# params.yaml name -> diffusers beta_schedule
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2",
             "scaled_linear": "scaled_linear", "sigmoid": "sigmoid"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++", "unipc")


def noise_scheduler(schedule: str, num_train_timesteps: int = 1000,
                    prediction_type: str = "v_prediction", snr_shift: float = 1.0) -> DDPMScheduler:
    """The training noise process (DDPM, Ho et al. 2020) for a named beta schedule.

    snr_shift s > 1 divides the signal-to-noise ratio at every t by s^2: the same schedule for an
    image s times larger per side, whose neighbouring pixels share more of the signal ("simple
    diffusion", Hoogeboom et al. 2023, shifts by 64 / resolution)."""
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("diffusion.prediction_type", prediction_type, PREDICTION_TYPES)
    if snr_shift <= 0:
        raise UserError(f"params.yaml: diffusion.snr_shift is {snr_shift}; expected a number > 0 (1 = no shift)")
    common = dict(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, clip_sample=True)
    base = DDPMScheduler(**common, beta_schedule=SCHEDULES[schedule])
    if snr_shift == 1.0:
        return base
    ab = base.alphas_cumprod.double()
    ab = ab / (ab + snr_shift ** 2 * (1 - ab))  # SNR = ab / (1 - ab) -> SNR / s^2
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    return DDPMScheduler(**common, trained_betas=betas.float().tolist())


def sampler_scheduler(name: str, train: DDPMScheduler, clip: bool = True):
    """A sampler's scheduler built from the training betas, so every schedule (sigmoid
    included, which the fast samplers lack) works with every sampler."""
    check_choice("sample.sampler", name, SAMPLERS)
    common = dict(num_train_timesteps=train.config.num_train_timesteps,
                  trained_betas=train.betas.tolist(), prediction_type=train.config.prediction_type)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=clip, timestep_spacing="trailing")
    if name == "ddim":  # trailing spacing starts at t = T-1 (Lin et al. 2024)
        return DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=False,
                             timestep_spacing="trailing")
    solver = UniPCMultistepScheduler if name == "unipc" else DPMSolverMultistepScheduler
    # sde-dpmsolver++: the stochastic second-order solver (Lu et al. 2022, sec. 5), which adds
    # fresh noise at every step, drawn from the per-image generators like DDPM's
    extra = {} if name == "unipc" else {"algorithm_type": name}
    # Thresholding keeps the x0 estimate in [-1, 1]; without it a cosine schedule saturated.
    return solver(**common, **extra, solver_order=2, thresholding=clip, sample_max_value=1.0,
                  timestep_spacing="trailing")


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t (B,)."""
    ab = scheduler.alphas_cumprod.to(t.device)[t]
    return ab / (1 - ab)


def predicted_x0(scheduler, xt: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The clean estimate x0 (B, C, R, R) from x_t and the model output `out` at timesteps t (B,)
    or (1,): x0 = sqrt(ab) x_t - sqrt(1 - ab) v (v-prediction), (x_t - sqrt(1 - ab) eps) / sqrt(ab)
    (epsilon), ab = alpha_bar_t. Not clamped: latents have no fixed range."""
    ab = scheduler.alphas_cumprod.to(xt.device)[t.long()].float().view(-1, 1, 1, 1)
    out = out.float()
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * xt - (1 - ab).sqrt() * out
    return (xt - (1 - ab).sqrt() * out) / ab.sqrt()


def self_conditioned(model) -> bool:
    """Whether `model` (or the module an accelerate wrapper holds) takes x_self_cond."""
    config = getattr(getattr(model, "module", model), "config", None)
    return bool(getattr(config, "self_condition", False))


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_timesteps(b: int, num_train_timesteps: int, kind: str = "uniform", logit_std: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(b,) integer timesteps in [0, T): uniform, or logit-normal, t / T = sigmoid(N(0, logit_std^2))
    (Esser et al. 2024, SD3): more of the batch at middle noise levels, where layout and shape are
    decided, fewer near t = 0 (denoising fine grain) and t = T (pure noise)."""
    check_choice("train.timestep_sampling", kind, TIMESTEP_SAMPLING)
    if kind == "uniform":
        return torch.randint(0, num_train_timesteps, (b,), generator=generator)
    u = torch.sigmoid(torch.randn(b, generator=generator) * logit_std)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def diffusion_loss(model, scheduler: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor,
                   snr_gamma: float | None = 5.0, generator: torch.Generator | None = None,
                   timesteps: str = "uniform", logit_std: float = 1.0, object_weight: float = 0.0) -> torch.Tensor:
    """MSE on the scheduler's prediction target, optionally min-SNR weighted (Hang et al. 2023).

    x0: (B, 3, R, R) in [-1, 1]; labels: (B, 24). Noise and timesteps come from `generator`
    (a CPU generator, so resumed runs draw the same numbers on any device); `timesteps` and
    `logit_std` choose their distribution (sample_timesteps).
    object_weight w > 0 (pixels only): each pixel's error weighs 1 + w on the objects of x0
    (data.object_mask), a weighted mean per image. The objects cover ~1-5% of a frame and carry
    every label. A weight that depends on x0 moves the optimum from the posterior mean towards
    objects where the posterior is wide (high noise): a trade measured on val, not free.
    A self-conditioned model (model.self_condition) gets, on half of the batches (a coin from
    `generator`), its own x0 estimate from a first pass without gradient as the extra input,
    and zeros otherwise, as the sampler gives it the previous step's estimate and, at the
    first step, zeros (Chen et al. 2023).
    """
    b, dev = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(dev)
    t = sample_timesteps(b, scheduler.config.num_train_timesteps, timesteps, logit_std, generator).to(dev)
    xt = scheduler.add_noise(x0, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if v_pred else noise
    sc = {}  # no estimate: a self-conditioned model reads zeros
    if self_conditioned(model) and torch.rand(1, generator=generator).item() < 0.5:
        with torch.no_grad():
            sc["x_self_cond"] = predicted_x0(scheduler, xt, t, model(xt, t, labels))
    err = (model(xt, t, labels, **sc).float() - target.float()).pow(2)
    if object_weight:
        w = 1 + object_weight * object_mask(x0.float())  # (B, 1, R, R)
        err = (w * err).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
    else:
        err = err.mean(dim=(1, 2, 3))
    if snr_gamma:
        s = snr(scheduler, t)
        # min(SNR, gamma) weighting expressed for the eps / v targets
        err = err * torch.clamp(s, max=snr_gamma) / (s + 1 if v_pred else s)
    return err.mean()


def _guided(model, x, t, labels, guidance: float, x_self_cond: torch.Tensor | None = None):
    """Model output with classifier-free guidance: u + w (c - u) (Ho & Salimans 2022). Both
    branches see the same self-conditioning estimate x_self_cond (None: none yet, or a model
    without self-conditioning)."""
    sc = {} if x_self_cond is None else {"x_self_cond": x_self_cond}
    if guidance == 1.0:
        return model(x, t.expand(len(x)), labels, **sc)
    sc = {k: torch.cat([v, v]) for k, v in sc.items()}
    both = model(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([labels, torch.zeros_like(labels)]), **sc)
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def denoise(model, scheduler, labels: torch.Tensor, generators: list[torch.Generator], steps: int,
            guidance: float = 1.0, frames: int = 0, interval=(0.0, 1.0), clamp: bool = True):
    """Run the reverse process for one batch.

    labels: (B, 24); generators: one per image (CPU). Guidance applies only at timesteps t with
    lo <= t / T <= hi, interval = (lo, hi) (Kynkaanniemi et al. 2024: guidance at every noise
    level costs diversity and, at high noise, layout). Returns the final x0 (B, C, R, R)
    (C, R: the model's in_channels and resolution), clamped to [-1, 1] if `clamp` (pixels; not
    latents), and, if frames > 0, a list of `frames` intermediate x_t from noise to the end.
    """
    dev, res, ch = labels.device, model.config.resolution, model.config.in_channels
    x = torch.cat([torch.randn((1, ch, res, res), generator=g) for g in generators]).to(dev)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=dev)  # also resets multistep solver state
    keep = set(torch.linspace(0, steps, frames).round().long().tolist()) if frames else set()
    history = [x.clone()] if 0 in keep else []
    # stochastic samplers (DDPM) draw their step noise from the per-image generators too
    step_kw = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    lo, hi = (v * scheduler.config.num_train_timesteps for v in interval)
    self_cond, x0_est = self_conditioned(model), None  # x0_est: the previous step's x0
    for i, t in enumerate(scheduler.timesteps):
        w = guidance if lo <= t.item() <= hi else 1.0
        xin, tt = scheduler.scale_model_input(x, t), t.reshape(1).to(dev)
        out = _guided(model, xin, tt, labels, w, x0_est)
        if self_cond:
            x0_est = predicted_x0(scheduler, xin, tt, out)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
        if i + 1 in keep:
            history.append(x.clone())
    return (x.clamp(-1, 1) if clamp else x), history
