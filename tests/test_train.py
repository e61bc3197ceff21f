import json
import re

import pytest
import torch
from accelerate.state import AcceleratorState

import iclevr_ddpm.train as T
from iclevr_ddpm.errors import UserError
from iclevr_ddpm.model import model_kwargs
from iclevr_ddpm.pipeline import IclevrPipeline


def _cfg(**kw):
    # fp32: "auto" would time both precisions on this CPU (test_auto_precision_...)
    return T.TrainConfig(**{"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 10,
                            "log_every": 5, "device": "cpu", "mixed_precision": "no", **kw})


def _run(tmp, data, cfg, name):
    AcceleratorState._reset_state(reset_partial_state=True)  # a new process per run, as the stage
    return T.train(cfg, model_kwargs({"preset": "tiny"}), {}, "cosine", data, tmp / f"{name}_model",
                   tmp / f"{name}_ckpt", tmp / f"{name}_live")


def _weights(path):
    return IclevrPipeline.from_pretrained(path).unet.state_dict()


def test_train_writes_model_metrics_and_dvclive(tiny_processed, tmp_path):
    data = tiny_processed[0] / "iclevr.pt"
    res = _run(tmp_path, data, _cfg(), "a")
    assert res["steps"] == 20 and res["images_seen"] == 160 and res["parameters"] > 1e5
    assert json.loads((tmp_path / "a_model" / "model_index.json").read_text())["_class_name"] == "IclevrPipeline"
    assert (tmp_path / "a_model" / "scheduler" / "scheduler_config.json").exists()
    loss_rows = (tmp_path / "a_live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t") == ["step", "loss"] and len(loss_rows) == 1 + 4
    assert len(_grad_norms(tmp_path / "a_live")) == 4
    assert json.loads((tmp_path / "a_live" / "metrics.json").read_text())["step"] == 20


def _grad_norms(live):
    rows = (live / "plots" / "metrics" / "grad_norm.tsv").read_text().splitlines()
    return [float(r.split("\t")[1]) for r in rows[1:]]


def test_logged_gradient_norm_is_taken_before_clipping(tiny_processed, tmp_path):
    data = tiny_processed[0] / "iclevr.pt"
    _run(tmp_path, data, _cfg(max_steps=10, grad_clip=1e-4), "clipped")
    norms = _grad_norms(tmp_path / "clipped_live")
    assert len(norms) == 2 and all(1e-3 < n < 1e4 for n in norms)  # not the clip's 1e-4


def test_resume_after_kill_matches_uninterrupted_run(tiny_processed, tmp_path, kill_after_first_save):
    data = tiny_processed[0] / "iclevr.pt"
    _run(tmp_path, data, _cfg(), "full")
    revive = kill_after_first_save(T)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, data, _cfg(), "resumed")
    assert not (tmp_path / "resumed_model").exists()
    revive()
    res = _run(tmp_path, data, _cfg(), "resumed")
    assert res["steps"] == 20 and res["steps_this_run"] == 10
    full, resumed = _weights(tmp_path / "full_model"), _weights(tmp_path / "resumed_model")
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)


@pytest.mark.parametrize("fails", [None, "loop", "setup"], ids=["finishes", "fails_in_loop", "fails_in_setup"])
def test_train_ends_the_process_group_it_ran_in(tiny_processed, tmp_path, monkeypatch, fails):
    # a gloo worker that exits with its group alive can abort in teardown (SIGABRT, seen once in
    # tests/test_multiprocess.py), so every process ends the group, finished or raising
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    data = tiny_processed[0] / "iclevr.pt"
    try:
        if fails == "loop":
            def step(*args):
                raise FloatingPointError("boom")
            monkeypatch.setattr(T, "train_step", step)
            with pytest.raises(FloatingPointError, match="boom"):
                _run(tmp_path, data, _cfg(max_steps=5), "pg")
        elif fails == "setup":  # the probe is set up before the loop, and has no evaluator here
            with pytest.raises(UserError, match="needs an evaluator"):
                _run(tmp_path, data, _cfg(max_steps=5, eval_every=5), "pg")
        else:
            assert _run(tmp_path, data, _cfg(max_steps=5), "pg")["steps"] == 5
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_auto_precision_on_a_bf16_cpu_is_timed_and_kept_on_resume(tiny_processed, tmp_path, monkeypatch,
                                                                   kill_after_first_save, capsys):
    data = tiny_processed[0] / "iclevr.pt"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    timed = []

    def faster(step, steps, bf16=True):  # times nothing; checks the step it was given runs in both
        step(False), step(True)
        timed.append(steps)
        return bf16, {"fp32": 1.0, "bf16": 0.5 if bf16 else 2.0}
    monkeypatch.setattr(T, "faster_precision", faster)
    revive = kill_after_first_save(T)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, data, _cfg(mixed_precision="auto"), "auto")
    assert "train precision: bf16 (seconds per step {'fp32': 1.0, 'bf16': 0.5})" in capsys.readouterr().out
    assert torch.load(tmp_path / "auto_ckpt" / "checkpoint.pt", weights_only=True)["precision"] == "bf16"
    revive()
    monkeypatch.setattr(T, "faster_precision", lambda step, steps: faster(step, steps, bf16=False))
    res = _run(tmp_path, data, _cfg(mixed_precision="auto"), "auto")
    assert res["precision"] == "bf16" and res["steps_this_run"] == 10 and timed == [5]  # resumed: not timed again
    res = _run(tmp_path, data, _cfg(mixed_precision="auto", max_steps=4), "fresh")
    assert res["precision"] == "no" and timed == [5, 5]  # fp32 measured faster
    assert _run(tmp_path, data, _cfg(mixed_precision="bf16", max_steps=4), "set")["precision"] == "bf16"
    assert timed == [5, 5]  # a set precision is not timed


def test_changed_params_start_fresh(tiny_processed, tmp_path, capsys):
    data = tiny_processed[0] / "iclevr.pt"
    _run(tmp_path, data, _cfg(max_steps=10), "x")
    res = _run(tmp_path, data, _cfg(max_steps=10, lr=5e-4), "x")
    assert res["steps_this_run"] == 10
    assert "settings changed since this checkpoint; starting fresh" in capsys.readouterr().out


def test_nan_loss_names_the_step(tiny_processed, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.diffusion_loss

    def nan_on_third(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(T, "diffusion_loss", nan_on_third)
    with pytest.raises(FloatingPointError, match="training loss is nan at step 3"):
        _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(), "nan")


def test_a_collapsing_loss_stops_training_with_its_step(tiny_processed, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = T.diffusion_loss

    def jump_after_eight(*a, **kw):  # the loss 100x higher from step 9 on, finite throughout
        calls["n"] += 1
        return real(*a, **kw) * (100.0 if calls["n"] > 8 else 1.0)

    monkeypatch.setattr(T, "diffusion_loss", jump_after_eight)
    with pytest.raises(FloatingPointError, match=r"training collapsed at step \d+: .* over 5 times .*, after 0 of "
                                                 r"train.collapse_rollbacks 0 rollbacks; try a lower train.lr") as e:
        _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(), "collapse")
    assert 9 <= int(re.search(r"at step (\d+):", str(e.value))[1]) <= 16  # after the jump, within a few steps
    calls["n"] = 0
    _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(collapse_factor=0.0), "unchecked")  # off: runs through
    assert calls["n"] == 20


def _lrs(live):
    rows = (live / "plots" / "metrics" / "lr.tsv").read_text().splitlines()[1:]
    return {int(r.split("\t")[0]): float(r.split("\t")[1]) for r in rows}


def test_a_collapse_rolls_back_to_the_older_checkpoint_at_a_lower_lr(tiny_processed, tmp_path, monkeypatch, capsys):
    data, state = tiny_processed[0] / "iclevr.pt", {"n": 0, "scaled": False}
    real_loss, real_scale = T.diffusion_loss, T.Run.scale_lr

    def jump_until_scaled(*a, **kw):  # 100x from step 23 on, until the lr has been lowered
        state["n"] += 1
        return real_loss(*a, **kw) * (100.0 if state["n"] > 22 and not state["scaled"] else 1.0)

    def scale(run, factor):
        state["scaled"] = True
        real_scale(run, factor)

    monkeypatch.setattr(T, "diffusion_loss", jump_until_scaled)
    monkeypatch.setattr(T.Run, "scale_lr", scale)
    cfg = _cfg(max_steps=40, collapse_rollbacks=1, rollback_lr_scale=0.25)
    res = _run(tmp_path, data, cfg, "rolled")
    detected = int(re.search(r"collapsed at step (\d+):.*: back to step 10 ", capsys.readouterr().out)[1])
    assert 23 <= detected <= 30  # seen within a few steps; back to 10, not to 20 (< checkpoint_every before)
    assert res["steps"] == 40 and res["rollbacks"] == 1 and res["steps_this_run"] == 40 + detected - 10
    assert state["n"] == res["steps_this_run"]
    ckpt = torch.load(tmp_path / "rolled_ckpt" / "checkpoint.pt", weights_only=True)
    assert ckpt["rollbacks"] == 1 and ckpt["lr_scheduler"]["base_lrs"] == [pytest.approx(cfg.lr * 0.25)]
    monkeypatch.setattr(T, "diffusion_loss", real_loss)
    _run(tmp_path, data, _cfg(max_steps=40), "plain")
    rolled, plain = _lrs(tmp_path / "rolled_live"), _lrs(tmp_path / "plain_live")
    assert rolled[35] == pytest.approx(plain[35] * 0.25) and rolled[35] > 0  # the schedule's shape, scaled


def test_keeping_rollback_checkpoints_changes_nothing_without_a_collapse(tiny_processed, tmp_path):
    data = tiny_processed[0] / "iclevr.pt"
    res = _run(tmp_path, data, _cfg(collapse_rollbacks=2), "kept")
    _run(tmp_path, data, _cfg(), "none")
    kept, none = _weights(tmp_path / "kept_model"), _weights(tmp_path / "none_model")
    assert res["rollbacks"] == 0 and all(torch.equal(kept[k], none[k]) for k in kept)


def test_rollbacks_are_counted_and_then_the_collapse_stops_training(tiny_processed, tmp_path, monkeypatch):
    real = T.diffusion_loss
    calls = {"n": 0}

    def jump_from_23(*a, **kw):  # never recovers, whatever the lr
        calls["n"] += 1
        return real(*a, **kw) * (100.0 if calls["n"] > 22 else 1.0)

    monkeypatch.setattr(T, "diffusion_loss", jump_from_23)
    with pytest.raises(FloatingPointError, match=r"collapsed at step \d+: .*, after 1 of train.collapse_rollbacks 1 "):
        _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(max_steps=60, collapse_rollbacks=1), "spent")
    calls["n"] = 0  # every 20 steps: at the collapse (~step 25) only step 20 is saved, nothing older
    with pytest.raises(FloatingPointError, match=r"collapsed at step \d+: .*, with no older checkpoint"):
        _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(max_steps=40, checkpoint_every=20, collapse_rollbacks=1),
             "early")
    with pytest.raises(UserError, match="train.rollback_lr_scale 1.5; expected >= 0 and in"):
        _cfg(collapse_rollbacks=1, rollback_lr_scale=1.5)


def test_timestep_sampling_reaches_the_loss(tiny_processed, tmp_path, monkeypatch):
    import iclevr_ddpm.diffusion as D
    drawn, real = [], D.sample_timesteps
    monkeypatch.setattr(D, "sample_timesteps", lambda *a: drawn.append(real(*a)) or drawn[-1])
    _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(max_steps=10, timestep_sampling="logit_normal",
                                                          logit_std=0.1), "ln")
    t = torch.cat(drawn)
    assert len(drawn) == 10 and t.numel() == 80
    assert ((t > 400) & (t < 600)).all(), t  # sigmoid(N(0, 0.1^2)) * 1000 stays within 500 +- 100


def test_training_attention_runs_on_the_exact_kernel(tiny_processed, tmp_path, monkeypatch):
    # the fused CPU kernel's gradients are wrong at large logits (model.exact_attention)
    fused, real = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: fused.append(torch.backends.cuda.flash_sdp_enabled()) or real(*a, **kw))
    _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(max_steps=3), "exact")
    assert len(fused) >= 3 * 3 and not any(fused)  # >= 3 attention layers per step, none fused


def _tiny_evaluator_and_val(tmp, processed):
    """A (random) evaluator file and the tiny set's val.json: what the probe needs."""
    from iclevr_ddpm.evaluator import build_evaluator, save_evaluator
    torch.manual_seed(0)
    save_evaluator(build_evaluator(), tmp / "evaluator.pth")
    return tmp / "evaluator.pth", processed / "val.json"


EVAL = {"eval_every": 10, "eval_images": 4, "eval_sample": {"steps": 2, "frames": 2, "batch_size": 4}}


def test_val_accuracy_is_logged_during_training(tiny_processed, tmp_path):
    evaluator, val = _tiny_evaluator_and_val(tmp_path, tiny_processed[0])
    res = T.train(_cfg(**EVAL), model_kwargs({"preset": "tiny"}), {}, "cosine", tiny_processed[0] / "iclevr.pt",
                  tmp_path / "m", tmp_path / "c", tmp_path / "live", evaluator, val)
    rows = (tmp_path / "live" / "plots" / "metrics" / "val_accuracy.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "val_accuracy"]
    logged = [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows[1:]]
    assert [step for step, _ in logged] == [10, 20] and all(0 <= a <= 1 for _, a in logged)
    minutes = (tmp_path / "live" / "plots" / "metrics" / "train_minutes.tsv").read_text().splitlines()
    assert len(minutes) == 3 and 0 < float(minutes[1].split("\t")[1]) < float(minutes[2].split("\t")[1])
    # the last figure is the saved EMA model's, scored again from scratch
    from iclevr_ddpm.diffusion import noise_scheduler
    probe = T.ValProbe(_cfg(**EVAL), noise_scheduler("cosine"), evaluator, val, "cpu")
    assert len(probe.conditions) == 4
    again = probe(IclevrPipeline.from_pretrained(tmp_path / "m").unet)
    assert res["val_accuracy"] == round(logged[-1][1], 4) == round(again, 4)
    assert res["eval_seconds"] > 0


def test_eval_every_without_evaluator_fails_before_training(tiny_processed, tmp_path):
    with pytest.raises(ValueError, match="train.eval_every needs an evaluator"):
        _run(tmp_path, tiny_processed[0] / "iclevr.pt", _cfg(**EVAL), "noeval")
    assert not (tmp_path / "noeval_ckpt").exists()


def test_unknown_eval_sample_key_fails_at_start():
    with pytest.raises(ValueError, match="train.eval_sample.sampler_name is not a known key"):
        _cfg(eval_sample={"sampler_name": "ddim"})


@pytest.mark.parametrize("power, mean", [(2 / 3, 38.49), (0.75, 35.35)])
def test_ema_power_sets_the_averaging_window(power, mean):
    # params.yaml's formula: decay = min(ema_decay, 1 - (1 + step)^-ema_power), step = updates before
    run = T.Run(_cfg(ema_power=power), model_kwargs({"preset": "tiny"}))
    p, expected = next(run.model.parameters()), 0.0
    for step in range(50):
        with torch.no_grad():
            p.fill_(float(step))  # weights 0, 1, ..., 49: the EMA is a weighted mean of the steps
        run.ema.step(run.model.parameters())
        decay = min(0.999, 1 - (1 + step) ** -power) if step else 0.0
        expected = decay * expected + (1 - decay) * step
    ema = run.ema.shadow_params[0].flatten()[0].item()
    assert ema == pytest.approx(expected, rel=1e-5)
    assert ema == pytest.approx(mean, abs=0.01)  # the longer window (0.75) lags further behind 49


def test_adam_beta2_sets_the_second_moment_average():
    # AdamW's v after gradients 1 then 3: beta2 (1 - beta2) 1^2 + (1 - beta2) 3^2
    run = T.Run(_cfg(adam_beta2=0.9), model_kwargs({"preset": "tiny"}))
    p = next(run.model.parameters())
    for g in (1.0, 3.0):
        run.opt.zero_grad(set_to_none=False)
        p.grad = torch.full_like(p, g)
        run.opt.step()
    v = run.opt.state[p]["exp_avg_sq"].flatten()[0].item()
    assert v == pytest.approx(0.9 * 0.1 * 1 + 0.1 * 9, rel=1e-6)  # 0.999 would give 0.010


@pytest.mark.parametrize("schedule, at_6", [("cosine_warmup", 0.883), ("linear_warmup", 14 / 18)])
def test_lr_schedules_warm_up_then_decay_to_zero(schedule, at_6):
    # max_steps 20, warm-up 2: lr(1) = peak / 2; then peak at step 2, peak / 2 at step 11, 0 at 20;
    # step 6 tells the two decays apart: cosine 0.5 (1 + cos(pi 4/18)) = 0.883, linear 14/18 = 0.778
    run = T.Run(_cfg(lr_schedule=schedule, lr=1.0), model_kwargs({"preset": "tiny"}))
    lrs = [run.lr_sched.get_last_lr()[0]]
    for _ in range(20):
        run.opt.step()
        run.lr_sched.step()
        lrs.append(run.lr_sched.get_last_lr()[0])
    assert lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.0)
    assert lrs[11] == pytest.approx(0.5) and lrs[6] == pytest.approx(at_6, abs=1e-3)
