import json

import pytest
import torch

import iclevr_ddpm.train as T
from iclevr_ddpm.model import ConditionalUNet, model_kwargs


def _cfg(**kw):
    return T.TrainConfig(**{"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 10,
                            "log_every": 5, "device": "cpu", **kw})


def _run(tmp, data, cfg, name):
    return T.train(cfg, model_kwargs({"preset": "tiny"}), {}, "cosine", data, tmp / f"{name}_model",
                   tmp / f"{name}_ckpt", tmp / f"{name}_live")


def _weights(path):
    return ConditionalUNet.from_pretrained(path).state_dict()


def test_train_writes_model_metrics_and_dvclive(tiny_processed, tmp_path):
    data = tiny_processed[0] / "iclevr.pt"
    res = _run(tmp_path, data, _cfg(), "a")
    assert res["steps"] == 20 and res["images_seen"] == 160 and res["parameters"] > 1e5
    assert (tmp_path / "a_model" / "scheduler" / "scheduler_config.json").exists()
    loss_rows = (tmp_path / "a_live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t") == ["step", "loss"] and len(loss_rows) == 1 + 4
    assert json.loads((tmp_path / "a_live" / "metrics.json").read_text())["step"] == 20


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
