"""benchmarks/side_by_side.py: variant specs become the params.yaml each variant runs with;
benchmarks/processes.py: what it launches."""
import importlib.util
import inspect
import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    """The script at path as a module (benchmarks/ and stages/ are not packages; benchmarks/ is
    on pytest's pythonpath for the stage_run they import)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sbs():
    return _load(ROOT / "benchmarks" / "side_by_side.py")


def test_variant_overrides_dotted_keys_with_yaml_values(sbs):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    name, params = sbs.variant_params("adagn=model.conditioning=scale_shift,train.max_steps=300,schedule=linear,"
                                      "sample.guidance_interval=[0.2, 0.8]")
    assert name == "adagn"
    assert params["model"]["conditioning"] == "scale_shift" and params["train"]["max_steps"] == 300
    assert params["schedule"] == "linear" and params["sample"]["guidance_interval"] == [0.2, 0.8]
    assert params["train"]["lr"] == base["train"]["lr"]  # the rest as in params.yaml
    assert sbs.variant_params("base=") == ("base", base)


def test_written_variant_folders_hold_their_params(sbs, tmp_path):
    assert sbs.write_variants(tmp_path, ["a=train.lr=0.0042", "b="]) == ["a", "b"]
    assert yaml.safe_load((tmp_path / "a" / "params.yaml").read_text())["train"]["lr"] == 0.0042
    assert (tmp_path / "b" / "params.yaml").exists()


def test_a_failed_variant_leaves_the_others_scored(sbs, tmp_path, monkeypatch, capsys):
    class Train:  # stands in for stages/train.py: "bad" exits 1, "good" writes its train.json
        def __init__(self, cmd, cwd, **kw):
            self.rc = int(Path(cwd).name == "bad")
            if not self.rc:
                (Path(cwd) / "train.json").write_text(json.dumps(
                    {"steps": 8, "wall_seconds": 70.0, "eval_seconds": 10.0, "images_per_second": 3.2}))

        def wait(self):
            return self.rc
    monkeypatch.setattr(sbs.subprocess, "Popen", Train)
    monkeypatch.setattr(sbs, "score_val", lambda d, *a: {"accuracy": 0.5, "hits": 259, "labels": 518})
    with pytest.raises(SystemExit, match=r"training failed: .*bad/train\.log"):
        sbs.side_by_side(str(tmp_path), "bad=train.lr=1", "good=", ev=Path("ev"), ae=Path("ae"))
    out = capsys.readouterr().out
    assert f"| bad | training failed: {tmp_path / 'bad' / 'train.log'} |" in out
    assert "| good | 8 | 1.0 | 3.2 | - | 0.5 (259/518) |" in out


def test_a_failed_sampling_stage_names_the_variant_and_shows_its_error(sbs, tmp_path):
    """A typo in an override (sample.guidance_scale for sample.guidance) stops with the stage's
    own message, not a bare exit status; no model is needed, the params are read first."""
    with pytest.raises(SystemExit) as err:
        sbs.sample_only(str(tmp_path), "g5=sample.guidance_scale=5", ev=tmp_path / "ev", model=tmp_path / "ddpm")
    msg = str(err.value)
    assert msg.startswith(f"g5: sample.py failed (exit 2) with {tmp_path / 'g5' / 'params.yaml'}")
    assert "sample.guidance_scale is not a known key" in msg


def test_processes_runs_the_train_stage_with_its_arguments_and_the_global_batch(tmp_path, monkeypatch):
    """benchmarks/processes.py: two processes get half the batch each, and the stage's full argument list."""
    procs, stage = _load(ROOT / "benchmarks" / "processes.py"), _load(ROOT / "stages" / "train.py")
    calls = []

    def fake_run(cmd, cwd, **kw):
        calls.append(cmd)
        (Path(cwd) / "train.json").write_text(json.dumps({"images_per_second": 1.0}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_run)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["batch_size"]
    for n in (1, 2):
        procs.run(tmp_path, 5, n)
        written = yaml.safe_load((tmp_path / f"p{n}" / "params.yaml").read_text())["train"]
        assert written["batch_size"] == base // n and written["max_steps"] == 5 and written["eval_every"] == 0
        script = calls[-1].index(str(ROOT / "stages/train.py"))
        assert len(calls[-1][script + 1:]) == len(inspect.signature(stage.main).parameters)
    assert "--num_processes" in calls[1] and calls[1][calls[1].index("--num_processes") + 1] == "2"


def test_processes_stops_with_the_stage_error_of_a_failed_run(tmp_path, monkeypatch):
    """A failing stages/train.py under the launcher stops with the run's folder, the script and
    its last error lines, not a bare CalledProcessError."""
    procs = _load(ROOT / "benchmarks" / "processes.py")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Traceback ...\nerror: params.yaml: train.batch_size: 0: expected a positive integer\n"))
    with pytest.raises(SystemExit) as err:
        procs.run(tmp_path, 5, 2)
    msg = str(err.value)
    assert msg.startswith(f"p2: train.py failed (exit 1) with {tmp_path / 'p2' / 'params.yaml'}:")
    assert msg.endswith("train.batch_size: 0: expected a positive integer")
