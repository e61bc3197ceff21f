"""Stage `preprocess`: raw iCLEVR folder -> one tensor file + validated condition files.

Usage: python stages/preprocess.py RAW_DIR OUT_TENSOR_FILE CONDITIONS_DIR METRICS_JSON
"""

from iclevr_ddpm.data import preprocess
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import load_params, save_json


def main(raw_dir: str, out_file: str, conditions_dir: str, metrics: str) -> None:
    p = load_params()["data"]
    stats = preprocess(raw_dir, out_file, conditions_dir, size=p["size"],
                       heldout_fraction=p["heldout_fraction"], seed=p["seed"], val_size=p["val_size"])
    save_json(stats, metrics)
    print(f"preprocessed {stats['images']} images in {stats['seconds']} s -> {out_file}")


if __name__ == "__main__":
    run_stage(main, __doc__)
