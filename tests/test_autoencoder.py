"""The autoencoder of latent diffusion and the latent path end to end, on tiny configs."""
import json
from types import SimpleNamespace

import pytest
import torch

import iclevr_ddpm.autoencoder as A
from iclevr_ddpm import train as T
from iclevr_ddpm.data import load_processed, object_mask, to_model_range
from iclevr_ddpm.errors import UserError
from iclevr_ddpm.evaluator import build_evaluator, save_evaluator
from iclevr_ddpm.model import model_kwargs, model_space
from iclevr_ddpm.pipeline import IclevrPipeline
from iclevr_ddpm.sampling import SampleConfig, sample_split

TINY = dict(channels=8, blocks=[0, 1, 1], latent_channels=3, steps=6, batch_size=4, checkpoint_every=3,
            log_every=2, gate_images=4, min_accuracy=0.0, device="cpu")


def test_round_trip_shape_range_and_unit_scaled_latents(tiny_processed):
    torch.manual_seed(0)
    ae = A.build_autoencoder(A.AutoencoderConfig(**TINY)).eval()
    x = to_model_range(load_processed(tiny_processed[0] / "iclevr.pt")[0][:6])  # (6, 3, 64, 64)
    assert A.downscale(ae) == 4
    A.fit_scaling(ae, x)
    z = A.encode(ae, x, batch_size=4)  # batching must not matter
    assert z.shape == (6, 3, 16, 16)
    assert torch.allclose(z, A.encode(ae, x), atol=1e-5)
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-3
    rec = A.decode(ae, z)
    assert rec.shape == x.shape and rec.min() >= -1 and rec.max() <= 1
    # the scaling is undone exactly on the way back: the same image as the unscaled latents give
    raw = ae.encode(x).latents
    assert torch.allclose(rec, ae.decode(raw).sample.clamp(-1, 1), atol=1e-4)


def test_object_mask_marks_the_objects_not_the_floor():
    x = torch.linspace(-0.3, 0.1, 64).expand(2, 3, 64, 64).clone()  # a floor with a gradient
    x[0, :, 20:26, 30:36] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]  # a small red object
    m = object_mask(x)
    assert m.shape == (2, 1, 64, 64)
    assert m[0, 0, 20:26, 30:36].all() and m[1].sum() == 0  # the object; a bare floor has none
    far = torch.ones(64, 64, dtype=torch.bool)
    far[20 - 7:26 + 7, 30 - 7:36 + 7] = False  # beyond the box radius the floor is never marked
    assert m[0, 0][far].sum() == 0
    # a round trip that loses the object but keeps the floor: the weighting makes it cost ~8x more
    floor_only = SimpleNamespace(encode=lambda img: SimpleNamespace(latents=img),
                                 decode=lambda z: SimpleNamespace(sample=x[1:2]))
    plain, weighted = (A.reconstruction_loss(floor_only, x[:1], w).item() for w in (0.0, 10.0))
    assert plain > 0 and weighted > 5 * plain


def test_training_lowers_the_reconstruction_error(tiny_processed):
    torch.manual_seed(0)
    cfg = A.AutoencoderConfig(**TINY)
    ae = A.build_autoencoder(cfg)
    x = to_model_range(load_processed(tiny_processed[0] / "iclevr.pt")[0][:8])
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    before = A.reconstruction_loss(ae, x).item()
    for _ in range(60):
        loss = A.reconstruction_loss(ae, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert A.reconstruction_loss(ae, x).item() < 0.5 * before


def _evaluator(tmp):
    torch.manual_seed(0)
    save_evaluator(build_evaluator(), tmp / "evaluator.pth")
    return tmp / "evaluator.pth"


def test_stage_function_saves_scaling_and_resumes(tiny_processed, tmp_path, kill_after_first_save):
    data, ev = tiny_processed[0] / "iclevr.pt", _evaluator(tmp_path)
    args = (data, ev, tmp_path / "ae", tmp_path / "ae.pt", tmp_path / "live")
    revive = kill_after_first_save(A)
    with pytest.raises(KeyboardInterrupt):
        A.train_autoencoder(A.AutoencoderConfig(**TINY), *args)
    assert not (tmp_path / "ae").exists()
    revive()
    res = A.train_autoencoder(A.AutoencoderConfig(**TINY), *args)
    assert res["steps"] == 6 and res["latent_shape"] == [3, 16, 16]
    assert 0 <= res["heldout_accuracy_reconstructed"] <= 1 and res["reconstruction_mse"] > 0
    saved = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert saved["scaling_factor"] != 1.0 and saved["latent_channels"] == 3
    ae = A.load_autoencoder(tmp_path / "ae")
    assert ae.config.scaling_factor == saved["scaling_factor"]
    # the cosine lr resumed where the kill left it (a restarted one would end at step 3, lr > 0)
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 6 and state["optimizer"]["param_groups"][0]["lr"] == 0


def test_gate_failure_names_the_figures_and_saves_nothing(tiny_processed, tmp_path):
    cfg = A.AutoencoderConfig(**{**TINY, "min_accuracy": 1.01})
    with pytest.raises(UserError, match=r"reconstructions at [0-9.]+ \(originals [0-9.]+\), below "
                                        r"autoencoder.min_accuracy 1.01"):
        A.train_autoencoder(cfg, tiny_processed[0] / "iclevr.pt", _evaluator(tmp_path), tmp_path / "ae",
                            tmp_path / "ae.pt", tmp_path / "live")
    assert not (tmp_path / "ae").exists() and (tmp_path / "ae.pt").exists()


def test_bad_config_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="autoencoder.blocks"):
        A.AutoencoderConfig(blocks=[])
    with pytest.raises(UserError, match="autoencoder.lr_schedule"):
        A.AutoencoderConfig(lr_schedule="step")
    with pytest.raises(UserError, match="no saved autoencoder"):
        A.load_autoencoder(tmp_path)
    with pytest.raises(ValueError, match="model.space"):
        model_space({"space": "voxel"})
    assert "space" not in model_kwargs({"space": "latent", "preset": "cpu_latent"})


def test_latent_path_trains_probes_and_samples_end_to_end(tiny_processed, tmp_path, capsys):
    processed = tiny_processed[0]
    data, ev = processed / "iclevr.pt", _evaluator(tmp_path)
    A.train_autoencoder(A.AutoencoderConfig(**TINY), data, ev, tmp_path / "ae", tmp_path / "ae.pt", tmp_path / "l")
    cfg = T.TrainConfig(max_steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=2, device="cpu",
                        eval_every=2, eval_images=3, eval_sample={"steps": 2, "frames": 2, "batch_size": 3},
                        object_weight=3.0,  # the pixel default: latent diffusion trains without it
                        mixed_precision="no")  # auto times bf16: accelerate keeps the autoencoder's fp32 state
    kw = model_kwargs({"space": "latent", "preset": "tiny"})
    res = T.train(cfg, kw, {}, "cosine", data, tmp_path / "m", tmp_path / "c", tmp_path / "live", ev,
                  processed / "val.json", autoencoder=tmp_path / "ae")
    assert 0 <= res["val_accuracy"] <= 1
    assert "train.object_weight 3.0 weights image pixels; latent diffusion trains without it" in capsys.readouterr().out
    pipe = IclevrPipeline.from_pretrained(tmp_path / "m")
    assert pipe.vae is not None and pipe.unet.config.in_channels == 3 and pipe.unet.config.resolution == 16
    assert pipe.image_resolution == 64 and not pipe.scheduler.config.thresholding  # latents are not clipped
    images = sample_split(tmp_path / "m", processed / "test.json", tmp_path / "s",
                          SampleConfig(steps=2, frames=2, batch_size=8), tmp_path / "grid.png", tmp_path / "p.png")
    n = len(json.loads((processed / "test.json").read_text()))
    assert images.shape == (n, 3, 64, 64) and images.dtype == torch.uint8
    assert len(list((tmp_path / "s").glob("*.png"))) == n and (tmp_path / "p.png").exists()
