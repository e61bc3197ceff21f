"""Shared fixtures: the official iCLEVR files (skipped when absent) and a tiny rendered set."""
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "iclevr"

torch.set_num_threads(2)


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
