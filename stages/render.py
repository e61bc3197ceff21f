"""Stage `render`: synthesise the iCLEVR-like data set in the real one's layout.

Usage: python stages/render.py OUT_DIR
When params data.raw_dir points elsewhere (the real data), nothing is rendered.
"""
from pathlib import Path

import torch

from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import load_params
from iclevr_ddpm.render import write_dataset


def main(out_dir: str) -> None:
    params = load_params()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(params["data"]["raw_dir"]).resolve() != out.resolve():
        (out / "NOT_RENDERED.txt").write_text(
            f"data.raw_dir = {params['data']['raw_dir']}: using that data set, nothing rendered.\n")
        print(f"data.raw_dir is {params['data']['raw_dir']}: skipping the synthetic render")
        return
    torch.set_num_threads(params["render"].get("threads") or torch.get_num_threads())
    cfg = {k: v for k, v in params["render"].items() if k != "threads"}
    write_dataset(out, **cfg)


if __name__ == "__main__":
    run_stage(main, __doc__)
