"""The `iclevr-ddpm` command and the stage scripts, run as a user runs them: in a subprocess.
Each user mistake must give exit code 2 and exactly one line on stderr, `error: <where>: <what>`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from iclevr_ddpm.evaluator import build_evaluator, save_evaluator

ROOT = Path(__file__).resolve().parents[1]
CLI = shutil.which("iclevr-ddpm", path=str(Path(sys.executable).parent))
ENV = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS") or "2")


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    cmd = [CLI, *map(str, args)] if not str(args[0]).endswith(".py") else [sys.executable, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user mistake (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_evaluator(build_evaluator(), d / "evaluator.pth")
    (d / "conds.json").write_text(json.dumps([["red cube"], ["blue cube", "gray sphere"]]))
    (d / "empty.pth").write_bytes(b"")
    return d


def test_help_of_the_command_its_subcommands_and_the_stages():
    assert CLI, "iclevr-ddpm is not installed next to this Python (pip install -e .)"
    top = run("--help")
    assert top.returncode == 0 and "{sample,evaluate}" in top.stdout
    sample = run("sample", "--help")
    assert sample.returncode == 0 and "--labels" in sample.stdout and "MODEL_DIR" in sample.stdout
    evaluate = run("evaluate", "--help")
    assert evaluate.returncode == 0 and "IMAGE_DIR" in evaluate.stdout
    stage = run(ROOT / "stages" / "sample.py", "--help")
    assert stage.returncode == 0 and "Usage: python stages/sample.py MODEL_DIR" in stage.stdout


def test_sample_by_labels_then_evaluate(toy_model, files, tmp_path):
    done = run("sample", toy_model[2], "--labels", "red cube", "--labels", "blue cube,gray sphere",
               "--out", tmp_path / "out", "--steps", "4", "--grid", tmp_path / "grid.png", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]
    assert Image.open(tmp_path / "out" / "1.png").size == (64, 64) and (tmp_path / "grid.png").is_file()
    scored = run("evaluate", files / "evaluator.pth", tmp_path / "out", files / "conds.json",
                 "--json", tmp_path / "m.json", "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["labels"] == 3 and 0 <= metrics["hits"] <= 3 and json.loads(scored.stdout) == metrics


def test_missing_file(files, tmp_path):
    err = one_error(run("evaluate", files / "evaluator.pth", tmp_path, tmp_path / "nope.json"))
    assert err == f"error: {tmp_path / 'nope.json'}: file not found"


def test_missing_evaluator(files, tmp_path):
    err = one_error(run("evaluate", tmp_path / "evaluator.pth", tmp_path, files / "conds.json"))
    assert err == f"error: {tmp_path / 'evaluator.pth'}: file not found"


def test_file_that_is_not_a_checkpoint(files, tmp_path):
    err = one_error(run("evaluate", files / "empty.pth", tmp_path, files / "conds.json"))
    assert err == f"error: {files / 'empty.pth'}: not a PyTorch checkpoint file (EOFError)"


def test_unknown_label(toy_model, tmp_path):
    err = one_error(run("sample", toy_model[2], "--labels", "red cube,blue cub", "--out", tmp_path / "o"))
    assert err == "error: --labels: entry 0: unknown object name 'blue cub' (did you mean 'blue cube'?)"
    assert not (tmp_path / "o").exists()


def test_bad_param_value(toy_model, files, tmp_path):
    err = one_error(run("sample", toy_model[2], files / "conds.json", "--out", tmp_path / "o", "--sampler", "euler"))
    assert err.startswith("error: iclevr-ddpm sample: argument --sampler: invalid choice: 'euler'")
    err = one_error(run("sample", toy_model[2], files / "conds.json", "--out", tmp_path / "o", "--steps", "0"))
    assert err == "error: iclevr-ddpm sample: argument --steps: '0' is not a positive integer"
    err = one_error(run("sample", toy_model[2], files / "conds.json", "--out", tmp_path / "o",
                        "--guidance-interval", "0.8", "0.2"))
    assert err == "error: --guidance-interval: 0.8 0.2: expected 0 <= LO <= HI <= 1"
    # the same mistake in params.yaml, through the sample stage
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    text = (tmp_path / "params.yaml").read_text().replace("sampler: dpmsolver++     #", "sampler: euler     #")
    (tmp_path / "params.yaml").write_text(text)
    err = one_error(run(ROOT / "stages" / "sample.py", toy_model[2], files / "conds.json", "o", "g.png", "p.png",
                        cwd=tmp_path))
    assert err.startswith("error: params.yaml: sample.sampler 'euler' unknown; expected one of ['ddpm',")


def test_missing_model_folder(tmp_path):
    err = one_error(run("sample", tmp_path / "ddpm", "--labels", "red cube", "--out", tmp_path / "o"))
    assert err.startswith(f"error: {tmp_path / 'ddpm'}: model folder not found; expected the folder")
    assert "huggingface" not in err


def test_image_count_does_not_match_conditions(files, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "0.png")
    err = one_error(run("evaluate", files / "evaluator.pth", tmp_path, files / "conds.json"))
    assert err == (f"error: {tmp_path}: 1 PNG images, expected 2 named 0.png .. 1.png "
                   f"(one per condition of {files / 'conds.json'})")


def test_stage_with_wrong_arguments_and_the_traceback_switch(files, tmp_path):
    err = one_error(run(ROOT / "stages" / "evaluate.py", files / "evaluator.pth", cwd=ROOT))
    assert err.startswith("error: evaluate.py: 1 arguments, expected 5. Usage: python stages/evaluate.py")
    args = ("evaluate", tmp_path / "evaluator.pth", tmp_path, files / "conds.json")
    shown = run("--traceback", *args)
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    shown = run(*args, env=dict(ENV, ICLEVR_DDPM_TRACEBACK="1"))
    assert shown.returncode == 1 and "UserError" in shown.stderr
