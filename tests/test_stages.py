"""Stage entry scripts: thin wrappers, checked for the behaviour they own."""
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_render_stage_renders_nothing_for_real_data(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["raw_dir"] = "/somewhere/iclevr"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "render.py"), "data/raw"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "skipping the synthetic render" in res.stdout
    assert [p.name for p in (tmp_path / "data" / "raw").iterdir()] == ["NOT_RENDERED.txt"]


def test_unknown_sample_param_fails_before_work(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"]["sampler_name"] = "ddim"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "sample.py"), "m", "c.json", "o", "g.png", "p.png"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode != 0
    assert "params.yaml: sample.sampler_name is not a known key" in res.stderr
    assert not (tmp_path / "o").exists()
