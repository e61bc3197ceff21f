"""Shared fixtures: the official iCLEVR files (skipped when absent), a tiny rendered set and a
toy model trained to draw a red or a blue square."""
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "iclevr"

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # the 2 cores here, or fewer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process, its mixed precision fixed at the first
    Accelerator: each stage runs in its own process, while tests train many times in one."""
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def official():
    """Folder with the official objects.json, train.json, test.json, new_test.json."""
    if not (SHARED / "objects.json").exists():
        pytest.skip(f"official iCLEVR files not found in {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """A rendered synthetic raw folder: 12 scenes = 36 images."""
    from iclevr_ddpm.render import write_dataset
    out = tmp_path_factory.mktemp("raw")
    write_dataset(out, scenes=12, seed=3, batch_size=8)
    return out


@pytest.fixture(scope="session")
def tiny_processed(tiny_raw, tmp_path_factory):
    from iclevr_ddpm.data import preprocess
    out = tmp_path_factory.mktemp("processed")
    stats = preprocess(tiny_raw, out / "iclevr.pt", out, heldout_fraction=0.25, seed=0)
    return out, stats


@pytest.fixture
def kill_after_first_save(monkeypatch):
    """kill(module): module.save_torch writes its first checkpoint, then raises as a kill would.
    Returns a function that lets the module save normally again."""
    def kill(module):
        real = module.save_torch

        def killed(obj, path):
            real(obj, path)
            raise KeyboardInterrupt("simulated kill")
        monkeypatch.setattr(module, "save_torch", killed)
        return lambda: monkeypatch.setattr(module, "save_torch", real)
    return kill


RED, BLUE = (0.8, -0.8, -0.8), (-0.8, -0.5, 0.8)


def toy_batch(labels: torch.Tensor) -> torch.Tensor:
    """16x16 mid-grey floor (0 in [-1, 1]) with an 8x8 centre square: red for 'red cube', else blue.
    labels: (B, 24) multi-hot -> (B, 3, 16, 16) in [-1, 1]."""
    from iclevr_ddpm import labels as L
    x = torch.zeros(len(labels), 3, 16, 16)
    red = labels[:, L.INDEX["red cube"]] > 0
    for i, is_red in enumerate(red.tolist()):
        x[i, :, 4:12, 4:12] = torch.tensor(RED if is_red else BLUE)[:, None, None]
    return x


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory):
    """A tiny model trained on toy_batch scenes, and its saved IclevrPipeline folder:
    (model, training scheduler, folder)."""
    from iclevr_ddpm import labels as L
    from iclevr_ddpm.diffusion import diffusion_loss, noise_scheduler, sampler_scheduler
    from iclevr_ddpm.model import ConditionalUNet, model_kwargs
    from iclevr_ddpm.pipeline import IclevrPipeline
    torch.manual_seed(0)
    model = ConditionalUNet(**model_kwargs({"preset": "tiny"}))
    sched = noise_scheduler("cosine", prediction_type="v_prediction")
    steps = 1200  # 800 left one sample in 8 the wrong colour on an AVX512 CPU: train to convergence
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    pair = L.multi_hot([["red cube"], ["blue cube"]])
    for _ in range(steps):
        y = pair[torch.randint(2, (32,), generator=g)]
        x0 = toy_batch(y)
        y[torch.rand(32, generator=g) < 0.1] = 0
        loss = diffusion_loss(model, sched, x0, y, snr_gamma=5.0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    model.eval()
    out = tmp_path_factory.mktemp("toy_model")
    IclevrPipeline(unet=model, scheduler=sampler_scheduler("dpmsolver++", sched)).save_pretrained(out)
    return model, sched, out
