"""End to end: `dvc repro` and `dvc exp run -S schedule=linear` on tiny params in a
temporary git repository holding the project's tracked files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "render": {"scenes": 24},
    "data": {"heldout_fraction": 0.25},
    "model": {"preset": "tiny"},
    "train": {"max_steps": 20, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 10, "eval_every": 10,
              "eval_images": 4, "eval_sample": {"steps": 4, "frames": 2, "batch_size": 4}},
    "sample": {"steps": 8, "frames": 8, "batch_size": 16},
    "evaluator": {"epochs": 1, "batch_size": 32},
    "autoencoder": {"channels": 8, "steps": 6, "batch_size": 8, "gate_images": 8, "min_accuracy": 0.0},
}


def run(cmd, cwd):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               TQDM_DISABLE="1", OMP_NUM_THREADS="2")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if shutil.which("dvc", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("dvc is not installed next to this Python")
    dst = tmp_path_factory.mktemp("pipeline")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("metrics/", "dvc.lock", "dvclive/", "plots/")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "test"],
                ["git", "config", "user.email", "test@example.com"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


@pytest.mark.slow
def test_repro_then_experiment_with_linear_schedule(repo):
    out = run(["dvc", "repro"], repo)
    assert "Running stage 'evaluate@new_test'" in out
    for split in ("test", "new_test"):
        m = json.loads((repo / "metrics" / f"{split}.json").read_text())
        assert 0 <= m["accuracy"] <= 1 and m["images"] == 32
        assert len(list((repo / "samples" / split).glob("*.png"))) == 32
        assert (repo / "plots" / f"{split}_grid.png").exists()
    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert data["images"] == 72 and data["val_conditions"] == data["heldout_images"] == 18
    val = json.loads((repo / "metrics" / "val.json").read_text())
    assert val["images"] == 18 and 0 <= val["accuracy"] <= 1
    assert 0 <= json.loads((repo / "metrics" / "train.json").read_text())["val_accuracy"] <= 1
    assert (repo / "dvclive" / "train" / "plots" / "metrics" / "val_accuracy.tsv").exists()
    assert json.loads((repo / "metrics" / "autoencoder.json").read_text()) == {"trained": False}  # pixel space
    assert "up to date" in run(["dvc", "status"], repo)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        subprocess.run(cmd, cwd=repo, check=True)

    out = run(["dvc", "exp", "run", "-S", "schedule=linear"], repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "sample@val", "sample@test", "sample@new_test",
                   "evaluate@val", "evaluate@test", "evaluate@new_test"}
    diff = run(["dvc", "metrics", "diff", "--all"], repo)
    assert "metrics/test.json" in diff and "metrics/new_test.json" in diff and "accuracy" in diff
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    assert "schedule" in show and "metrics/test.json:accuracy" in show

    out = run(["dvc", "exp", "run", "-S", "model.space=latent"], repo)  # latent diffusion
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"train_autoencoder", "train", "evaluate@test"} <= ran
    ae = json.loads((repo / "metrics" / "autoencoder.json").read_text())
    assert ae["trained"] and ae["latent_shape"] == [8, 16, 16]
    assert (repo / "models" / "ddpm" / "vae" / "config.json").exists()
    assert json.loads((repo / "metrics" / "test.json").read_text())["images"] == 32
