"""Stage `train`: train the conditional DDPM; the EMA model is the output. Every
train.eval_every steps it measures val_accuracy (samples of val scored by the evaluator).
With model.space: latent it trains on the latents of the autoencoder in AUTOENCODER_DIR.

Usage: python stages/train.py TENSOR_FILE MODEL_DIR CHECKPOINT_DIR LIVE_DIR METRICS_JSON EVALUATOR_PTH VAL_JSON AUTOENCODER_DIR
Multi-GPU: accelerate launch --multi_gpu stages/train.py ... (same arguments).
"""

from iclevr_ddpm.config import from_params
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import load_params, save_json
from iclevr_ddpm.model import model_kwargs, model_space
from iclevr_ddpm.train import TrainConfig, train


def main(data: str, model_dir: str, ckpt_dir: str, live_dir: str, metrics: str, evaluator: str,
         val_conditions: str, autoencoder: str) -> None:
    params = load_params()
    cfg = from_params(TrainConfig, params["train"], "train")
    latent = model_space(params["model"]) == "latent"
    result = train(cfg, model_kwargs(params["model"]), params["diffusion"], params["schedule"],
                   data, model_dir, ckpt_dir, live_dir, evaluator, val_conditions,
                   autoencoder if latent else None)
    if result is not None:  # the main process (the others return None)
        save_json(result, metrics)
        print(result)


if __name__ == "__main__":
    run_stage(main, __doc__)
