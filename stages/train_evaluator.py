"""Stage `train_evaluator`: train the ResNet18 evaluator (or adopt the official checkpoint).

Usage: python stages/train_evaluator.py TENSOR_FILE OUT_PTH CHECKPOINT LIVE_DIR METRICS_JSON
"""

from iclevr_ddpm.config import from_params
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.evaluator import EvaluatorConfig, train_evaluator
from iclevr_ddpm.io import load_params, save_json


def main(data: str, out: str, ckpt: str, live_dir: str, metrics: str) -> None:
    cfg = from_params(EvaluatorConfig, load_params()["evaluator"], "evaluator")
    result = train_evaluator(cfg, data, out, ckpt, live_dir)
    save_json(result, metrics)
    print(result)


if __name__ == "__main__":
    run_stage(main, __doc__)
