"""Stage `sample`: generate one 64x64 PNG per condition, a grid and a progression image.

Usage: python stages/sample.py MODEL_DIR CONDITIONS_JSON OUT_DIR GRID_PNG PROGRESSION_PNG
Works on any conditions file and output folder, outside the pipeline too.
"""
import time

from iclevr_ddpm.config import from_params
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import load_params
from iclevr_ddpm.sampling import SampleConfig, sample_split


def main(model_dir: str, conditions: str, out_dir: str, grid: str, progression: str) -> None:
    cfg = from_params(SampleConfig, load_params()["sample"], "sample")
    t0 = time.perf_counter()
    images = sample_split(model_dir, conditions, out_dir, cfg, grid, progression)
    print(f"{len(images)} samples ({cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance}) "
          f"in {time.perf_counter() - t0:.1f} s -> {out_dir}")


if __name__ == "__main__":
    run_stage(main, __doc__)
