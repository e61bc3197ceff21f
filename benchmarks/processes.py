"""One training process against two (accelerate, gloo on the CPU; DDP on GPUs), not a test.

    python benchmarks/processes.py [STEPS] [OUT_DIR]     (default 100 steps, /tmp/iclevr_processes)

Runs stages/train.py with the project's params.yaml (val probe off) for STEPS steps: once as
one process on every core, once as `accelerate launch --multi_gpu --num_processes 2` with
the cores split between them and train.batch_size halved per process (the same recipe: the
same global batch), and prints images/s for each. Needs data/processed/iclevr.pt.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from stage_run import ROOT, run_quiet, stage_script

ARGS = [str(ROOT / "data/processed/iclevr.pt"), "m", "ck", "live", "train.json", "unused.pth",
        str(ROOT / "data/processed/val.json"), "unused_autoencoder"]


def run(out: Path, steps: int, processes: int) -> dict:
    d = out / f"p{processes}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    batch = params["train"]["batch_size"] // processes  # per process; the global batch stays
    params["train"].update(max_steps=steps, eval_every=0, checkpoint_every=steps, batch_size=batch)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    threads = max(1, torch.get_num_threads() // processes)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = (launcher if processes > 1 else [sys.executable]) + [stage_script("train"), *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    run_quiet(cmd, d, env)
    return {"threads_each": threads, **json.loads((d / "train.json").read_text())}


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/iclevr_processes")
    print("| processes | threads each | steps | images | seconds | images/s |\n|---|---|---|---|---|---|")
    for n in (1, 2):
        r = run(out, steps, n)
        print(f"| {n} | {r['threads_each']} | {r['steps']} | {r['images_seen']} | {r['wall_seconds']} | "
              f"{r['images_per_second']} |", flush=True)
