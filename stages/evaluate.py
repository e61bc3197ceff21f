"""Stage `evaluate`: official top-k accuracy of a folder of samples.

Usage: python stages/evaluate.py EVALUATOR_PTH IMAGE_DIR CONDITIONS_JSON METRICS_JSON TABLE_CSV
Works on any folder of {i}.png images and conditions file.
"""

from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.evaluator import score_folder
from iclevr_ddpm.io import atomic_path, load_params, save_json


def main(evaluator: str, image_dir: str, conditions: str, metrics: str, table: str) -> None:
    device = (load_params().get("evaluator") or {}).get("device", "auto")
    result, df = score_folder(evaluator, image_dir, conditions, device)
    save_json(result, metrics)
    with atomic_path(table) as tmp:
        df.to_csv(tmp, index=False)
    print(f"{image_dir}: accuracy {result['accuracy']:.4f} ({result['hits']}/{result['labels']} labels)")


if __name__ == "__main__":
    run_stage(main, __doc__)
