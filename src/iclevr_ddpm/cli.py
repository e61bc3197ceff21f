"""The `iclevr-ddpm` command line: `sample` and `evaluate`, outside the pipeline.

    iclevr-ddpm sample models/ddpm --labels "red cube,blue sphere" --out samples/mine
    iclevr-ddpm evaluate models/evaluator.pth samples/mine data/processed/test.json

A user mistake prints one `error:` line and exits 2 (errors.guarded); --traceback shows it whole.
"""
from __future__ import annotations

import argparse
import sys
import time

from .errors import TRACEBACK_ENV, UserError, guarded


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        raise UserError(f"{self.prog}: {message}")


def _sample(args) -> None:
    from . import labels as L
    from .sampling import SampleConfig, load_pipeline, sample_conditions
    if (args.conditions is None) == (not args.labels):
        raise UserError(f"{args.prog}: give a conditions file or --labels (not both)")
    lo, hi = args.guidance_interval  # checked here to name the flag (SampleConfig names the param)
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(f"--guidance-interval: {lo} {hi}: expected 0 <= LO <= HI <= 1")
    if args.labels:
        conditions = [L.check_names([n.strip() for n in s.split(",")], "--labels", i) for i, s in enumerate(args.labels)]
    else:
        conditions = L.load_conditions(args.conditions)
    cfg = SampleConfig(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                       guidance_interval=list(args.guidance_interval), seed=args.seed, batch_size=args.batch_size,
                       device=args.device, out_size=args.size, frames=min(10, args.steps + 1),
                       progression=conditions[0])
    t0 = time.perf_counter()
    sample_conditions(load_pipeline(args.model, cfg), conditions, args.out, cfg, args.grid, args.progression)
    print(f"{len(conditions)} images ({cfg.sampler}, {cfg.steps} steps, guidance {cfg.guidance}) "
          f"in {time.perf_counter() - t0:.1f} s -> {args.out}/0.png ..")


def _evaluate(args) -> None:
    import json

    from .evaluator import score_folder
    from .io import atomic_path, save_json
    result, table = score_folder(args.evaluator, args.images, args.conditions, args.device)
    if args.json:
        save_json(result, args.json)
    if args.table:
        with atomic_path(args.table) as tmp:
            table.to_csv(tmp, index=False)
    print(json.dumps(result))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from .diffusion import SAMPLERS
    from .sampling import SampleConfig as D  # its defaults are the CLI's
    p = _Parser(prog="iclevr-ddpm", description="Sample and score a trained iCLEVR DDPM outside the pipeline.",
                epilog=f"A mistake prints one 'error:' line and exits 2; --traceback or {TRACEBACK_ENV}=1 "
                       "shows the traceback.")
    p.add_argument("--traceback", action="store_true", help="show tracebacks for user mistakes too")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("sample", help="draw one 64x64 PNG per condition",
                       description="Draw OUT/0.png, 1.png, ... one per condition, with a saved IclevrPipeline.")
    s.add_argument("model", metavar="MODEL_DIR", help="folder written by the train stage (models/ddpm)")
    s.add_argument("conditions", metavar="CONDITIONS_JSON", nargs="?",
                   help='a list of object-name lists, like test.json: [["red cube", "blue sphere"], ...]')
    s.add_argument("--labels", action="append", metavar='"red cube,blue sphere"',
                   help="one image's objects, comma-separated (repeat for more images)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced)")
    s.add_argument("--grid", metavar="PNG", help="also write an 8-per-row grid")
    s.add_argument("--progression", metavar="PNG", help="also write the first condition's denoising steps")
    s.add_argument("--sampler", choices=SAMPLERS, default=D.sampler)
    s.add_argument("--steps", type=_positive, default=D.steps)
    s.add_argument("--guidance", type=float, default=D.guidance, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="guide only where LO <= t/T <= HI")
    s.add_argument("--seed", type=int, default=D.seed, help="image i uses seed SEED + i")
    s.add_argument("--batch-size", type=_positive, default=D.batch_size)
    s.add_argument("--size", type=_positive, default=D.out_size, help="output side in pixels")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.set_defaults(run=_sample, prog=s.prog)
    e = sub.add_parser("evaluate", help="score a folder of samples with the official metric",
                       description="Top-k accuracy of IMAGE_DIR/0.png .. N-1.png against N conditions.")
    e.add_argument("evaluator", metavar="EVALUATOR", help="evaluator checkpoint (models/evaluator.pth, "
                                                         "or the official checkpoint.pth)")
    e.add_argument("images", metavar="IMAGE_DIR")
    e.add_argument("conditions", metavar="CONDITIONS_JSON")
    e.add_argument("--json", metavar="FILE", help="also write the metrics here")
    e.add_argument("--table", metavar="CSV", help="also write one row per condition")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.set_defaults(run=_evaluate, prog=e.prog)
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point `iclevr-ddpm`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    traceback = "--traceback" in argv[:1]

    def run():
        args = build_parser().parse_args(argv)
        args.run(args)
    return guarded(run, traceback=traceback)
