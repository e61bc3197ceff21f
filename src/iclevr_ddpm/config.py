"""Typed configs from params.yaml sections: unknown keys fail with the allowed ones listed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable, TypeVar

from .errors import UserError

T = TypeVar("T")


def check_choice(name: str, value, allowed) -> None:
    """Fail at start on an unknown param value, listing the allowed ones."""
    if value not in allowed:
        raise UserError(f"params.yaml: {name} {value!r} unknown; expected one of {list(allowed)}")


def from_params(cls: type[T], params: dict | None, section: str) -> T:
    """Build dataclass `cls` from params[section]-style dict, rejecting unknown keys."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise UserError(f"params.yaml: {section}.{unknown[0]} is not a known key; "
                         f"expected some of {sorted(names)}")
    return cls(**params)


def fingerprint(*objs) -> str:
    """Stable short hash of JSON-serialisable settings (detects a changed run on resume)."""
    blob = json.dumps([dataclasses.asdict(o) if dataclasses.is_dataclass(o) else o for o in objs],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


PRECISIONS = ("auto", "no", "fp16", "bf16")


def resolve_precision(mixed_precision: str, device: str, cpu_bf16: bool = False) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 (else 'fp16'); on the CPU 'bf16' when `cpu_bf16`
    and the CPU computes bfloat16 natively (AVX512-BF16 or AMX), else 'no'. Callers then keep
    bf16 on the CPU only where faster_precision measures it faster."""
    import torch
    check_choice("mixed_precision", mixed_precision, PRECISIONS)
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 and native else "no"


def faster_precision(step: Callable[[bool], None], steps: int = 3) -> tuple[bool, dict]:
    """(use bf16, seconds per step of each): bf16 autocast only where it measures faster.

    step(bf16) runs one training step of a throwaway model; it is called once untimed (oneDNN
    picks its kernels then) and `steps` times timed per precision. A CPU that reports native
    bf16 is not always faster with it: the evaluator ran 1.8x faster in bf16 on one machine
    here and 13% slower on another, the DDPM 1.3x faster and 40% slower (docs/image-quality.md)."""
    timing = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        step(bf16)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(bf16)
        timing[name] = (time.perf_counter() - t0) / steps
    return timing["bf16"] < timing["fp32"], {k: round(v, 3) for k, v in timing.items()}
