"""The autoencoder's gate against training time (not a test): train the latent-diffusion
autoencoder for MINUTES on the training split and, every EVERY minutes, print the evaluator's
accuracy on 500 held-out images and on their reconstructions (the figure the gate of the
train_autoencoder stage checks), then the same on 1,000 at the end.

    python benchmarks/autoencoder_gate.py MINUTES EVERY [KEY=VALUE ...] [--init=DIR] [--out=DIR]

KEY=VALUE: fields of AutoencoderConfig (channels=32 blocks=[0,2,2] latent_channels=8
object_weight=10 ...); --init continues from a saved autoencoder; --decay lowers the lr from
cfg.lr to 0 along a cosine over the MINUTES (by the clock, as the run is timed). Reads
data/processed/iclevr.pt and models/evaluator.pth; OMP_NUM_THREADS sets the cores.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from iclevr_ddpm import autoencoder as A
from iclevr_ddpm.data import load_processed, to_model_range
from iclevr_ddpm.evaluator import load_evaluator

ROOT = Path(__file__).resolve().parents[1]


def gate(ae, ev, x, xh, yh, n: int) -> dict:
    """Gate scores of a copy of the training weights (the scaling is fitted on the copy)."""
    ae.eval()
    A.fit_scaling(ae, to_model_range(x[:1024]))
    scores = A.gate_scores(ae, ev, xh[:n], yh[:n])
    ae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    ae.train()
    return scores


def main(minutes: float, every: float, *overrides: str, init: str | None = None, out: str | None = None,
         decay: bool = False) -> None:
    cfg = A.AutoencoderConfig(**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    torch.manual_seed(cfg.seed)
    ae = A.AutoencoderTiny.from_pretrained(init) if init else A.build_autoencoder(cfg)
    ae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    x, _ = load_processed(ROOT / "data/processed/iclevr.pt", "train")
    xh, yh = load_processed(ROOT / "data/processed/iclevr.pt", "heldout")
    ev = load_evaluator(ROOT / "models/evaluator.pth")
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen, step, t0, next_report = torch.Generator().manual_seed(cfg.seed), 0, time.perf_counter(), every
    while (elapsed := time.perf_counter() - t0) < minutes * 60:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        if decay:  # cosine to 0 by the clock
            opt.param_groups[0]["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / (minutes * 60), 1)))
        loss = A.reconstruction_loss(ae, to_model_range(x[idx]), cfg.object_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if elapsed > next_report * 60:
            print(json.dumps({"images": step * cfg.batch_size, "minutes": round(elapsed / 60, 1),
                              "images_per_second": round(step * cfg.batch_size / elapsed, 1),
                              **gate(ae, ev, x, xh, yh, 500)}), flush=True)
            next_report += every
    print(json.dumps({"final": True, "images": step * cfg.batch_size, **gate(ae, ev, x, xh, yh, 1000)}), flush=True)
    if out:
        A.fit_scaling(ae.eval(), to_model_range(x[:2048]))
        ae.save_pretrained(out)


if __name__ == "__main__":
    opts = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(float(args[0]), float(args[1]), *args[2:], init=opts.get("init"), out=opts.get("out"),
         decay="decay" in opts)
