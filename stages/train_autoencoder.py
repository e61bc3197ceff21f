"""Stage `train_autoencoder`: the autoencoder of latent diffusion, gated by the evaluator's
accuracy on its held-out reconstructions. With model.space: pixel nothing is trained: the
folder holds only a note, and the metrics say so.

Usage: python stages/train_autoencoder.py TENSOR_FILE EVALUATOR_PTH OUT_DIR CHECKPOINT LIVE_DIR METRICS_JSON
"""

from iclevr_ddpm.autoencoder import AutoencoderConfig, train_autoencoder
from iclevr_ddpm.config import from_params
from iclevr_ddpm.errors import run_stage
from iclevr_ddpm.io import atomic_dir, load_params, save_json
from iclevr_ddpm.model import model_space


def main(data: str, evaluator: str, out_dir: str, ckpt: str, live_dir: str, metrics: str) -> None:
    params = load_params()
    cfg = from_params(AutoencoderConfig, params["autoencoder"], "autoencoder")
    if model_space(params["model"]) == "pixel":
        with atomic_dir(out_dir) as tmp:
            (tmp / "UNUSED.txt").write_text("model.space is pixel: no autoencoder is trained or used\n")
        result = {"trained": False}
    else:
        result = {"trained": True, **train_autoencoder(cfg, data, evaluator, out_dir, ckpt, live_dir)}
    save_json(result, metrics)
    print(result)


if __name__ == "__main__":
    run_stage(main, __doc__)
