"""Variants side by side (not a test): train each at once, each on its own share of the
cores, then sample and score the whole val split. Equal wall time means equal CPU minutes,
whatever this machine's speed is today.

    python benchmarks/side_by_side.py OUT_DIR NAME=KEY=VALUE[,KEY=VALUE...] NAME=... [--threads=1]
    python benchmarks/side_by_side.py --sample-only OUT_DIR NAME=KEY=VALUE... NAME=...
    (--evaluator=PATH: another evaluator than models/evaluator.pth; --model=DIR: with
    --sample-only, another model than models/ddpm; --autoencoder=DIR: the autoencoder of
    variants with model.space=latent, default models/autoencoder)

e.g. python benchmarks/side_by_side.py /tmp/ab base= adagn=model.conditioning=scale_shift
Each variant gets the project's params.yaml with its overrides (dotted keys, YAML values) in
OUT_DIR/NAME/ and runs stages/train.py, sample.py and evaluate.py there on the project's
data/processed and models/evaluator.pth. Prints one row per variant. --sample-only skips
training: it samples val with the pipeline's models/ddpm, one variant after the other.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from stage_run import ROOT, run_quiet, stage


def variant_params(spec: str) -> tuple[str, dict]:
    """'name=a.b=1,c=x,d.e=[1, 2]' -> ('name', params.yaml with params['a']['b'] = 1, params['c'] = 'x',
    params['d']['e'] = [1, 2])."""
    name, _, overrides = spec.partition("=")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in filter(None, re.split(r",(?![^\[]*\])", overrides)):  # no split inside [a, b]
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    return name, params


VAL = ROOT / "data/processed/val.json"


def score_val(d: Path, model: Path, ev: Path, env: dict) -> dict:
    """Sample every val condition with d/params.yaml's sampler, score it; metrics + seconds."""
    t0 = time.perf_counter()
    run_quiet(stage("sample", model, VAL, "val", "grid.png", "progression.png"), d, env)
    seconds = time.perf_counter() - t0
    run_quiet(stage("evaluate", ev, "val", VAL, "val.json", "val.csv"), d, env)
    return {**json.loads((d / "val.json").read_text()), "sample_seconds": round(seconds, 1)}


def write_variants(out: Path, specs) -> list[str]:
    names = []
    for spec in specs:
        name, params = variant_params(spec)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        names.append(name)
    return names


def sample_only(out: str, *specs: str, ev: Path, model: Path) -> None:
    out, env = Path(out), dict(os.environ, TQDM_DISABLE="1")
    print("| variant | val accuracy | sampling seconds |\n|---|---|---|")
    for name in write_variants(out, specs):
        v = score_val(out / name, model, ev, env)
        print(f"| {name} | {v['accuracy']} ({v['hits']}/{v['labels']}) | {v['sample_seconds']} |", flush=True)


def side_by_side(out: str, *specs: str, ev: Path, ae: Path, threads: int = 1) -> None:
    out, env = Path(out), dict(os.environ, TQDM_DISABLE="1")
    runs = {}
    for name in write_variants(out, specs):  # the cores shared out: `threads` each
        cmd = stage("train", ROOT / "data/processed/iclevr.pt", "ddpm", "ckpt", "live", "train.json", ev, VAL, ae)
        runs[name] = subprocess.Popen(cmd, cwd=out / name, env=dict(env, OMP_NUM_THREADS=str(threads)),
                                      stdout=open(out / name / "train.log", "w"), stderr=subprocess.STDOUT)
    failed = [name for name, proc in runs.items() if proc.wait()]
    print("| variant | steps | train minutes | images/s | val_accuracy in training | val (all) |")
    print("|---|---|---|---|---|---|")
    for name in runs:  # one after the other, on all cores; a failed variant costs no other its row
        d = out / name
        if name in failed:
            print(f"| {name} | training failed: {d / 'train.log'} | | | | |", flush=True)
            continue
        v, t = score_val(d, d / "ddpm", ev, env), json.loads((d / "train.json").read_text())
        print(f"| {name} | {t['steps']} | {(t['wall_seconds'] - t['eval_seconds']) / 60:.1f} | "
              f"{t['images_per_second']} | {t.get('val_accuracy', '-')} | {v['accuracy']} ({v['hits']}/{v['labels']}) |", flush=True)
    if failed:
        raise SystemExit("training failed: " + ", ".join(str(out / name / "train.log") for name in failed))


if __name__ == "__main__":
    opts = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    ev = Path(opts.get("evaluator") or ROOT / "models/evaluator.pth")
    if "sample-only" in opts:
        sample_only(*args, ev=ev, model=Path(opts.get("model") or ROOT / "models/ddpm"))
    else:
        side_by_side(*args, ev=ev, ae=Path(opts.get("autoencoder") or ROOT / "models/autoencoder"),
                     threads=int(opts.get("threads") or 1))
