"""Training loop for the conditional DDPM: accelerate (CPU, one or many GPUs, mixed
precision), diffusers EMA and LR schedules, dvclive logging, atomic checkpoints and
exact resume after a kill."""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from dvclive import Live
from tqdm import tqdm

from . import labels as L
from .autoencoder import encode, load_autoencoder
from .config import (PRECISIONS, check_choice, faster_precision, fingerprint, from_params, resolve_device,
                     resolve_precision)
from .data import load_processed, resize, to_model_range
from .diffusion import TIMESTEP_SAMPLING, diffusion_loss, noise_scheduler, sampler_scheduler
from .errors import UserError
from .evaluator import accuracy, load_evaluator, predict
from .io import atomic_dir, load_checkpoint, save_torch
from .model import ConditionalUNet, exact_attention
from .pipeline import IclevrPipeline
from .sampling import SampleConfig, generate

LR_SCHEDULES = ("constant", "cosine", "cosine_warmup", "linear_warmup")


@dataclass
class TrainConfig:
    device: str = "auto"          # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16/fp16 on CUDA; on the CPU bf16 where timed faster) | no | fp16 | bf16
    seed: int = 0
    batch_size: int = 32
    max_steps: int = 4000
    lr: float = 1e-3
    lr_schedule: str = "cosine_warmup"
    warmup_steps: int = 200
    weight_decay: float = 0.0
    adam_beta2: float = 0.999      # AdamW's second-moment decay (its first stays 0.9)
    grad_clip: float = 1.0
    collapse_factor: float = 5.0   # a collapse: the smoothed loss passes this times its low since warm-up
    collapse_rollbacks: int = 0    # on a collapse go back to the checkpoint before the latest, this many times
    rollback_lr_scale: float = 0.5  # and multiply the lr schedule by this at each rollback
    ema_decay: float = 0.999       # the cap of the EMA decay
    ema_power: float = 2 / 3       # warm-up: decay = min(ema_decay, 1 - (1 + step)^-ema_power)
    p_uncond: float = 0.1          # label dropout for classifier-free guidance
    snr_gamma: float = 5.0         # min-SNR loss weighting; 0 turns it off
    timestep_sampling: str = "uniform"  # uniform | logit_normal (diffusion.sample_timesteps)
    logit_std: float = 1.0         # spread of logit_normal
    object_weight: float = 0.0     # pixel loss weight 1 + w on objects (diffusion_loss); pixel space only
    checkpoint_every: int = 250
    log_every: int = 10
    eval_every: int = 0            # steps between val_accuracy measurements (0 = never)
    eval_images: int = 64          # the first eval_images conditions of val.json
    eval_sample: dict = field(default_factory=dict)  # sampler settings (SampleConfig fields) for it

    def __post_init__(self):
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("train.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_choice("train.mixed_precision", self.mixed_precision, PRECISIONS)
        if self.collapse_rollbacks < 0 or not 0 < self.rollback_lr_scale <= 1:
            raise UserError(f"params.yaml: train.collapse_rollbacks is {self.collapse_rollbacks} and "
                            f"train.rollback_lr_scale {self.rollback_lr_scale}; expected >= 0 and in (0, 1]")
        if self.object_weight < 0:
            raise UserError(f"params.yaml: train.object_weight is {self.object_weight}; expected >= 0 (0 = off)")
        from_params(SampleConfig, self.eval_sample, "train.eval_sample")  # fail at start on a bad key


# settings that change neither the trained weights nor their order of updates: a checkpoint
# written under other values of these is resumed
NOT_FINGERPRINTED = ("checkpoint_every", "log_every", "eval_every", "eval_images", "eval_sample",
                     "collapse_factor", "collapse_rollbacks", "rollback_lr_scale")


def _loss(cfg: TrainConfig, model, noise, x0: torch.Tensor, y: torch.Tensor, gen) -> torch.Tensor:
    """diffusion_loss with cfg's weighting and timestep sampling: the one loss that training
    steps and the precision timing compute."""
    return diffusion_loss(model, noise, x0, y, cfg.snr_gamma, gen, cfg.timestep_sampling, cfg.logit_std,
                          cfg.object_weight)


def _timed_step(cfg: TrainConfig, model_kw: dict, noise):
    """step(bf16): one training step, as train_step's, of a throwaway UNet of model_kw on a
    zero batch, in fp32 or in bf16 autocast (what faster_precision times)."""
    model = ConditionalUNet(**model_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    res, gen = model.config.resolution, torch.Generator().manual_seed(0)
    x, y = torch.zeros(cfg.batch_size, model.config.in_channels, res, res), torch.zeros(cfg.batch_size, L.NUM_LABELS)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), exact_attention(x.device):
            loss = _loss(cfg, model, noise, x, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _precision(cfg: TrainConfig, device: str, model_kw: dict, noise) -> str:
    """accelerate's mixed_precision: as set; 'auto' is bf16 (or fp16) on CUDA and, on a CPU
    with native bf16, the faster of bf16 and fp32 at cfg.batch_size, timed by the main process
    (bf16 trained 1.3x faster on one CPU here and 40% slower on another; docs/image-quality.md)."""
    precision = resolve_precision(cfg.mixed_precision, device, cpu_bf16=True)
    if cfg.mixed_precision != "auto" or device != "cpu" or precision != "bf16":
        return precision
    choice = [None]  # every process must train in the main process's choice
    if PartialState(cpu=True).is_main_process:
        bf16, timing = faster_precision(_timed_step(cfg, model_kw, noise), steps=5)
        choice = ["bf16" if bf16 else "no"]
        print(f"train precision: {'bf16' if bf16 else 'fp32'} (seconds per step {timing})")
    return broadcast_object_list(choice)[0]


def _lr_scheduler(cfg: TrainConfig, opt):
    # linear_warmup: warm-up, then straight to 0 at max_steps (Bergsma et al. 2025 found it ahead
    # of cosine for LLMs; here it scored 1.7 points under cosine on val, docs/image-quality.md)
    name = cfg.lr_schedule.removesuffix("_warmup")  # diffusers' name: constant | cosine | linear
    warmup = cfg.warmup_steps if name != cfg.lr_schedule else 0
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)


class Run:
    """Everything a checkpoint holds: model, EMA, optimizer, LR schedule, step and RNG."""

    def __init__(self, cfg: TrainConfig, model_kw: dict, seed_offset: int = 0):
        self.model = ConditionalUNet(**model_kw)
        # multi-tensor EMA and fused AdamW: one kernel over the UNet's 222 tensors instead of a
        # Python loop; on one core 12 -> 9 and 31 -> 9 ms of a ~250 ms step (benchmarks/bench.py)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power,
                            foreach=True, model_cls=ConditionalUNet, model_config=self.model.config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay, fused=True)
        self.lr_sched = _lr_scheduler(cfg, self.opt)
        self.gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
        self.step = 0
        self.train_seconds = 0.0  # optimisation time over all runs, evaluation excluded
        self.rollbacks = 0        # collapses rolled back so far (the lr schedule is scaled as many times)

    def state(self, fp: str, rngs: list[torch.Tensor]) -> dict:
        """rngs: every process's batch-generator state, by rank (the rest is the same on all)."""
        return {"fingerprint": fp, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "lr_scheduler": self.lr_sched.state_dict(), "rng": rngs,
                "train_seconds": self.train_seconds, "rollbacks": self.rollbacks}

    def load(self, state: dict, rank: int = 0) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        self.gen.set_state(state["rng"][rank])
        self.step = state["step"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.rollbacks = state.get("rollbacks", 0)

    def scale_lr(self, factor: float) -> None:
        """Multiply the lr schedule by factor from this step on: the schedule is a LambdaLR,
        lr = base_lr * lambda(step), so its base lrs scale (and travel in its state)."""
        self.lr_sched.base_lrs = [lr * factor for lr in self.lr_sched.base_lrs]
        for group, base in zip(self.opt.param_groups, self.lr_sched.base_lrs):
            group["initial_lr"] = base
            group["lr"] *= factor

    def ema_model(self) -> ConditionalUNet:
        """A new model holding the EMA weights, on the CPU, in eval mode."""
        model = ConditionalUNet.from_config(self.model.config)
        self.ema.copy_to(model.parameters())
        return model.eval()


class ValProbe:
    """val_accuracy of a model: samples the first `cfg.eval_images` val conditions with
    cfg.eval_sample's sampler and scores them with the evaluator (official metric)."""

    def __init__(self, cfg: TrainConfig, noise, evaluator_path, val_conditions, device, vae=None):
        self.vae = vae
        self.conditions = L.load_conditions(val_conditions)[:cfg.eval_images]
        self.labels = L.multi_hot(self.conditions)
        self.evaluator = load_evaluator(evaluator_path, device)
        self.sample_cfg = from_params(SampleConfig, cfg.eval_sample, "train.eval_sample")
        self.sampler = sampler_scheduler(self.sample_cfg.sampler, noise, self.sample_cfg.clip and vae is None)

    def __call__(self, model: ConditionalUNet) -> float:
        pipe = IclevrPipeline(unet=model, scheduler=self.sampler, vae=self.vae)
        images = generate(pipe, self.conditions, self.sample_cfg)
        return accuracy(predict(self.evaluator, images), self.labels)


def train_step(acc: Accelerator, model, opt, run: Run, noise, x_all: torch.Tensor, labels: torch.Tensor,
               cfg: TrainConfig) -> tuple[float, float]:
    """One optimisation step on a random batch of x_all (N, C, R, R) (pixels in [-1, 1] or scaled
    latents); returns the loss (the mean over processes) and the gradient norm before clipping."""
    idx = torch.randint(len(x_all), (cfg.batch_size,), generator=run.gen)
    x0, y = x_all[idx].to(acc.device), labels[idx].clone()
    y[torch.rand(len(y), generator=run.gen) < cfg.p_uncond] = 0.0  # label dropout -> null condition
    with acc.autocast(), exact_attention(acc.device):
        loss = _loss(cfg, model, noise, x0, y.to(acc.device), run.gen)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} at step {run.step + 1}; "
                                 f"try a lower train.lr or train.grad_clip")
    acc.backward(loss)
    # the norm is logged: a collapse shows in it first. An infinite max_norm clips nothing.
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    opt.step()
    run.lr_sched.step()
    opt.zero_grad(set_to_none=True)
    run.ema.step(acc.unwrap_model(model).parameters())
    run.step += 1
    # the mean over processes: every process judges a collapse on the same loss and rolls back with the rest
    return (acc.reduce(loss.detach(), "mean") if acc.num_processes > 1 else loss).item(), float(grad_norm)


def _log(live: Live | None, step: int, metrics: dict) -> None:
    if live is None:
        return
    live.step = step
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.make_summary()


def save_pipeline(model: ConditionalUNet, noise, cfg: TrainConfig, out_dir, vae=None) -> None:
    """Write out_dir as an IclevrPipeline (with the autoencoder `vae` for latent diffusion); its
    scheduler is eval_sample's sampler on the training betas, from which sampling rebuilds any
    other sampler (sampler_scheduler)."""
    name = from_params(SampleConfig, cfg.eval_sample, "train.eval_sample").sampler
    sampler = sampler_scheduler(name, noise, clip=vae is None)
    with atomic_dir(out_dir) as tmp:
        IclevrPipeline(unet=model, scheduler=sampler, vae=vae).save_pretrained(tmp)


def _check_in_sync(acc: Accelerator, model: torch.nn.Module) -> None:
    """With several processes, each prints a digest of its weights and all must agree (DDP
    averages the gradients, so processes that drew different batches still end the same)."""
    if acc.num_processes == 1:
        return
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    print(f"process {acc.process_index}/{acc.num_processes}: final weights sha256 {h.hexdigest()[:16]}", flush=True)
    digests = gather_object([h.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"processes ended with different weights: {digests}")


def _probe(cfg: TrainConfig, acc: Accelerator, noise, evaluator, val_conditions, vae) -> ValProbe | None:
    """The learning-curve probe on the main process when cfg.eval_every is set, else None."""
    if not cfg.eval_every or not acc.is_main_process:
        return None
    if evaluator is None or val_conditions is None:
        raise UserError("params.yaml: train.eval_every needs an evaluator and val conditions")
    return ValProbe(cfg, noise, evaluator, val_conditions, acc.device,
                    vae.to(acc.device) if vae is not None else None)


def _collapse(cfg: TrainConfig, step: int, loss_avg: float, low: float) -> str | None:
    """Why the run has collapsed, or None: the smoothed loss has risen to cfg.collapse_factor
    times its lowest since warm-up, `low`. A collapsed run (lr too high: the loss jumps from
    ~0.005 to 0.1-0.5 and stays there) need not reach a NaN; finished runs here rose at most 1.4x."""
    if step <= cfg.warmup_steps or not cfg.collapse_factor or not loss_avg > cfg.collapse_factor * low:
        return None
    return (f"training collapsed at step {step}: smoothed loss {loss_avg:.4g} is over "
            f"{cfg.collapse_factor:g} times its lowest since warm-up ({low:.4g})")


def _serialised(state: dict) -> bytes:
    """A checkpoint's state as the bytes torch.save writes: a copy off the device, read back
    with load_torch's weights_only=True like the file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class Rollback:
    """The last two checkpoints, in memory, and the way back to the older when training collapses.

    The older one was written at least checkpoint_every steps before the guard saw the collapse:
    the smoothed loss lags the raw loss by ~50 steps, so the latest may already hold damaged weights."""

    def __init__(self, cfg: TrainConfig, run: Run, device):
        self.cfg, self.run, self.device = cfg, run, device
        self.saved = collections.deque(maxlen=2)

    def keep(self, state: dict) -> None:
        if self.cfg.collapse_rollbacks:
            self.saved.append(_serialised(state))

    def __call__(self, why: str, rank: int) -> None:
        """Restore the older checkpoint with the lr schedule scaled by cfg.rollback_lr_scale;
        raise FloatingPointError(why) when the rollbacks are spent or there is no older checkpoint."""
        run, cfg = self.run, self.cfg
        if run.rollbacks >= cfg.collapse_rollbacks:
            spent = f"after {run.rollbacks} of train.collapse_rollbacks {cfg.collapse_rollbacks} rollbacks"
        elif len(self.saved) < 2:
            spent = "with no older checkpoint to roll back to"
        else:
            spent = None
        if spent is not None:
            raise FloatingPointError(f"{why}, {spent}; try a lower train.lr "
                                     f"(train.collapse_factor: 0 turns this check off)")
        seconds, rollbacks = run.train_seconds, run.rollbacks + 1
        run.load(torch.load(io.BytesIO(self.saved[0]), map_location="cpu", weights_only=True), rank)
        run.ema.to(self.device)
        run.train_seconds, run.rollbacks = seconds, rollbacks  # minutes spent stay spent
        run.scale_lr(cfg.rollback_lr_scale)
        self.saved.clear()
        print(f"{why}: back to step {run.step} with the lr schedule x{cfg.rollback_lr_scale ** rollbacks:g} "
              f"(rollback {rollbacks} of {cfg.collapse_rollbacks})", flush=True)


def _loop(acc: Accelerator, model, opt, run: Run, noise, x_all: torch.Tensor, labels: torch.Tensor,
          cfg: TrainConfig, probe: ValProbe | None, live: Live | None, save_checkpoint, rollback: Rollback) -> tuple:
    """Steps from run.step to cfg.max_steps: logs to `live`, probes val every cfg.eval_every steps,
    calls save_checkpoint() every cfg.checkpoint_every steps and at the end, and rollback() on a collapse.
    Returns (smoothed loss, last val_accuracy or None, evaluation seconds, wall seconds, steps run)."""
    t0, steps, loss_avg, val_acc, eval_seconds = time.perf_counter(), 0, math.nan, None, 0.0
    low = math.inf  # the lowest smoothed loss since warm-up
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", disable=not acc.is_main_process)
    while run.step < cfg.max_steps:
        t_step = time.perf_counter()
        loss, grad_norm = train_step(acc, model, opt, run, noise, x_all, labels, cfg)
        run.train_seconds += time.perf_counter() - t_step
        steps += 1
        loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
        why = _collapse(cfg, run.step, loss_avg, low)
        if why is not None:
            rollback(why, acc.process_index)  # raises when none is left
            save_checkpoint()  # a kill from here on resumes at the restored step and lr
            loss_avg, bar.n = low, run.step  # the restored weights were healthy: their loss was near the low
            continue
        low = min(low, loss_avg) if run.step > cfg.warmup_steps else low
        rate = steps * cfg.batch_size * acc.num_processes / (time.perf_counter() - t0 - eval_seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{rate:.0f}", refresh=False)
        if run.step % cfg.log_every == 0:
            _log(live, run.step, {"loss": loss, "loss_smooth": loss_avg, "lr": run.lr_sched.get_last_lr()[0],
                                  "grad_norm": grad_norm, "images_per_second": rate})
        if probe is not None and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
            t_eval = time.perf_counter()
            val_acc = probe(run.ema_model().to(acc.device))
            eval_seconds += time.perf_counter() - t_eval
            _log(live, run.step, {"val_accuracy": val_acc, "train_minutes": run.train_seconds / 60})
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.max_steps:
            save_checkpoint()
    bar.close()
    return loss_avg, val_acc, eval_seconds, time.perf_counter() - t0, steps


def _latent_inputs(cfg: TrainConfig, autoencoder, images: torch.Tensor, model_kw: dict) -> tuple:
    """(cfg, vae, x_all, model_kw) for diffusion on the latents of the autoencoder folder: the
    images (N, 3, S, S) uint8 encoded once to x_all (N, C, S/f, S/f), the UNet's resolution and
    channels the latents', and no object weight (it weights image pixels)."""
    if cfg.object_weight:  # a default of the pixel recipe: `-S model.space=latent` must still run
        print(f"train.object_weight {cfg.object_weight} weights image pixels; latent diffusion trains without it")
        cfg = replace(cfg, object_weight=0.0)
    vae = load_autoencoder(autoencoder)
    x_all = encode(vae, to_model_range(images))  # once, in memory
    return cfg, vae, x_all, {**model_kw, "resolution": x_all.shape[-1], "in_channels": x_all.shape[1]}


def _start(cfg: TrainConfig, device: str, noise, model_kw: dict, ckpt: Path,
           fp: str) -> tuple[Accelerator, Run, bool]:
    """(accelerator, run, resumed): a fresh Run, or the one in ckpt when it was written under
    the fingerprint fp. A resumed run keeps the precision it began in (timing may choose
    otherwise today)."""
    saved = load_checkpoint(ckpt, fp)  # None when absent or written under other settings
    precision = saved.get("precision") if saved else None
    acc = Accelerator(cpu=device == "cpu", mixed_precision=precision or _precision(cfg, device, model_kw, noise))
    set_seed(cfg.seed)  # same initial weights on every process and every run
    run = Run(cfg, model_kw, seed_offset=acc.process_index)
    if saved is not None:
        run.load(saved, acc.process_index)
        print(f"{ckpt}: resuming at step {run.step} (process {acc.process_index})")
    return acc, run, saved is not None


def _ends_process_group(fn):
    """fn, then (finished or raising) the end of the process group it ran in: a gloo worker that
    exits with its group alive can abort in teardown (SIGABRT, "terminate called without an
    active exception", pytorch/pytorch#190489). Nothing to end with one process."""
    @functools.wraps(fn)
    def ended(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return ended


@_ends_process_group
def train(cfg: TrainConfig, model_kw: dict, diffusion_kw: dict, schedule: str, data_path,
          out_dir, ckpt_dir, live_dir, evaluator=None, val_conditions=None, autoencoder=None) -> dict:
    """Train from the tensor file; write the EMA model to out_dir (save_pretrained).

    With `autoencoder` (a folder train_autoencoder wrote) diffusion runs on its latents: the
    images are encoded once, the UNet's resolution and channels are the latents', and the
    saved pipeline holds the autoencoder to decode.

    Every cfg.eval_every steps (and at the end) the EMA model's val_accuracy is measured with
    `evaluator` on `val_conditions` and logged with the training minutes so far.
    Returns the final figures (steps, images seen, wall time, images/s, parameters, val_accuracy)
    on the main process, None on the others: only the main process writes.
    """
    device = resolve_device(cfg.device)
    noise = noise_scheduler(schedule, **diffusion_kw)
    images, labels = load_processed(data_path, "train")
    vae, x_all = None, None
    if autoencoder is not None:
        cfg, vae, x_all, model_kw = _latent_inputs(cfg, autoencoder, images, model_kw)
    # one file for all processes, written by rank 0: a kill can never leave ranks at different steps
    ckpt = Path(ckpt_dir) / "checkpoint.pt"
    run_settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    fp = fingerprint(run_settings, model_kw, diffusion_kw, schedule, PartialState(cpu=device == "cpu").num_processes,
                     len(images), *([dict(vae.config)] if vae is not None else []))  # its scaling differs per training
    acc, run, resumed = _start(cfg, device, noise, model_kw, ckpt, fp)
    if vae is None:
        x_all = resize(to_model_range(images), run.model.config.resolution)  # once, in memory
    probe = _probe(cfg, acc, noise, evaluator, val_conditions, vae)
    # The LR schedule is not prepared: accelerate would step it once per process, and every
    # process here runs all max_steps (each draws its own batches).
    model, opt = acc.prepare(run.model, run.opt)
    run.ema.to(acc.device)
    live = Live(str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=None) if acc.is_main_process else None

    rollback = Rollback(cfg, run, acc.device)

    def save_checkpoint():
        rngs = gather_object([run.gen.get_state()])  # every rank's batch RNG, by rank
        state = {**run.state(fp, rngs), "precision": acc.mixed_precision}
        rollback.keep(state)
        if acc.is_main_process:
            save_torch(state, ckpt)

    loss_avg, val_acc, eval_seconds, seconds, steps_run = _loop(acc, model, opt, run, noise, x_all, labels, cfg,
                                                                probe, live, save_checkpoint, rollback)
    _check_in_sync(acc, run.model)
    if not acc.is_main_process:
        return None
    save_pipeline(run.ema_model(), noise, cfg, out_dir, vae.cpu() if vae is not None else None)
    live.end()
    images_per_s = steps_run * cfg.batch_size * acc.num_processes / max(seconds - eval_seconds, 1e-9)
    return {"steps": run.step, "steps_this_run": steps_run, "rollbacks": run.rollbacks,
            "images_seen": run.step * cfg.batch_size * acc.num_processes,
            "wall_seconds": round(seconds, 1), "eval_seconds": round(eval_seconds, 1),
            "images_per_second": round(images_per_s, 1), "precision": acc.mixed_precision,
            "parameters": sum(p.numel() for p in run.model.parameters()), "loss_smooth": round(loss_avg, 5),
            **({"val_accuracy": round(val_acc, 4)} if val_acc is not None else {})}
