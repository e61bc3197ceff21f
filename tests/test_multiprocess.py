"""The multi-GPU path, exercised on the CPU: `accelerate launch --multi_gpu --num_processes 2`
runs stages/train.py as two processes joined by gloo (the Accelerator is a CPU one here, so
accelerate picks MULTI_CPU). Ranks must draw different batches, end with the same weights,
leave the writing to rank 0, and resume together after a kill."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from iclevr_ddpm.pipeline import IclevrPipeline

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd: Path, data: Path) -> subprocess.Popen:
    """Two training processes on this project, in cwd (its params.yaml), writing m/, ck/, live/."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "stages" / "train.py"), str(data / "iclevr.pt"), "m", "ck", "live", "train.json",
           "unused.pth", str(data / "val.json"), "unused_autoencoder"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def project(tmp: Path, name: str, max_steps: int) -> Path:
    d = tmp / name
    d.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"preset": "tiny"}
    params["train"].update(max_steps=max_steps, batch_size=8, warmup_steps=2, checkpoint_every=10, log_every=5,
                           eval_every=0, device="cpu", mixed_precision="no")
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts the workers in their own sessions,
    so killing the launcher's group would leave them running)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def digests(out: str) -> dict[str, str]:
    return dict(re.findall(r"process (\d)/2: final weights sha256 (\w+)", out))


@pytest.mark.skipif(ACCELERATE is None or not Path("/proc/self/stat").exists(),
                    reason="needs the accelerate CLI and Linux /proc")
def test_two_processes_share_the_work_and_resume_together(tiny_processed, tmp_path):
    data = tiny_processed[0]
    full = project(tmp_path, "full", 60)
    out = finish(launch(full, data))
    # both ranks report, and report the same weights
    d = digests(out)
    assert set(d) == {"0", "1"} and d["0"] == d["1"], out
    ckpt = torch.load(full / "ck" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 60 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0], ckpt["rng"][1])  # each rank drew its own batches
    # only rank 0 wrote: one model, one set of dvclive rows, one checkpoint, one metrics file
    assert sorted(p.name for p in full.iterdir()) == ["ck", "live", "m", "params.yaml", "train.json"]
    assert sorted(p.name for p in (full / "ck").iterdir()) == ["checkpoint.pt"]
    steps = [int(r.split("\t")[0]) for r in (full / "live/plots/metrics/loss.tsv").read_text().splitlines()[1:]]
    assert steps == list(range(5, 61, 5))
    assert yaml.safe_load((full / "train.json").read_text())["images_seen"] == 60 * 8 * 2
    assert out.count("'images_seen': 960") == 1  # the summary is printed once

    # killed midway (SIGKILL to the launcher and both workers once a checkpoint exists), then resumed
    killed = project(tmp_path, "killed", 60)
    proc = launch(killed, data)
    while not (killed / "ck" / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    assert not (killed / "m").exists()
    out = finish(launch(killed, data))
    resumed = re.findall(r"resuming at step (\d+) \(process (\d)\)", out)
    assert len(resumed) == 2 and resumed[0][0] == resumed[1][0] and 0 < int(resumed[0][0]) < 60, out
    assert digests(out)["0"] == d["0"]  # the very weights of the uninterrupted run
    a = IclevrPipeline.from_pretrained(full / "m").unet.state_dict()
    b = IclevrPipeline.from_pretrained(killed / "m").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
