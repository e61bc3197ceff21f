"""Stage `train`: train the conditional DDPM; the EMA model is the output. Every
train.eval_every steps it measures val_accuracy (samples of val scored by the evaluator).

Usage: python stages/train.py TENSOR_FILE MODEL_DIR CHECKPOINT_DIR LIVE_DIR METRICS_JSON EVALUATOR_PTH VAL_JSON
Multi-GPU: accelerate launch --multi_gpu stages/train.py ... (same arguments).
"""

from iclevr_ddpm.config import from_params
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import load_params, save_json
from iclevr_ddpm.model import model_kwargs
from iclevr_ddpm.train import TrainConfig, train


def main(data: str, model_dir: str, ckpt_dir: str, live_dir: str, metrics: str, evaluator: str,
         val_conditions: str) -> None:
    params = load_params()
    cfg = from_params(TrainConfig, params["train"], "train")
    result = train(cfg, model_kwargs(params["model"]), params["diffusion"], params["schedule"],
                   data, model_dir, ckpt_dir, live_dir, evaluator, val_conditions)
    if result is not None:  # the main process (the others return None)
        save_json(result, metrics)
        print(result)


if __name__ == "__main__":
    run_stage(main, __doc__)
