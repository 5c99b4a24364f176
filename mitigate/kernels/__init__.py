"""Executors of an edit plan (:mod:`mitigate.plan`), by name.

A :class:`Kernel` runs any call of a plan (``run``: prefill, and decode when nothing was prepared), and
folds a plan once per generation for decode steps (``prepare``), which ``decode`` then runs with tensor
ops only. Every kernel gives the numbers of the eager reference (fp32 within 1e-5, bf16 within 2e-2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..plan import LayerPlan
from .call import KernelCall
from .reference import reference_attention
from .torch_decode import DecodePlan
from .torch_decode import decode as torch_decode
from .torch_decode import prepare as torch_prepare
from .torch_sdpa import torch_attention
from .triton_plan import available as triton_available
from .triton_plan import decode as triton_decode
from .triton_plan import prepare as triton_prepare
from .triton_plan import triton_attention


@dataclass
class Kernel:
    """``run(q, k, v, mask, plan, call)``, ``prepare(plan, **sizes) -> prepared``,
    ``decode(q, k, v, mask, prepared, call)``; outputs are ``[B, Nq, H, Dv]``."""

    name: str
    run: Callable[..., torch.Tensor]
    prepare: Callable[..., Any]
    decode: Callable[..., torch.Tensor]


def _reference_prepare(plan: LayerPlan, *, length: int, **_: Any) -> DecodePlan:
    return DecodePlan(length=length, general=plan)


def _reference_decode(query, key, value, mask, prepared: DecodePlan, call: KernelCall) -> torch.Tensor:
    return reference_attention(query, key, value, mask, prepared.general, call)


_KERNELS: dict[str, Kernel] = {
    "reference": Kernel("reference", reference_attention, _reference_prepare, _reference_decode),
    "torch": Kernel("torch", torch_attention, torch_prepare, torch_decode),
    "triton": Kernel("triton", triton_attention, triton_prepare, triton_decode),
}


def register_kernel(kernel: Kernel) -> None:
    _KERNELS[kernel.name] = kernel


def available_kernels() -> list[str]:
    return ["auto", *sorted(_KERNELS)]


def resolve_kernel(name: str, device: torch.device | str | None = None) -> str:
    """The concrete kernel name for ``name`` on ``device`` (``auto``: Triton on CUDA when installed, else
    the torch kernel)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if name == "auto":
        return "triton" if cuda and triton_available(device) else "torch"
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {available_kernels()}")
    if name == "triton" and not triton_available(device):
        raise ValueError(
            "kernel='triton' needs triton and a CUDA device (pip install 'mitigate[triton]'); on a CPU it "
            "runs only under TRITON_INTERPRET=1 (tests). kernel='torch' gives the same numbers anywhere."
        )
    return name


def get_kernel(name: str) -> Kernel:
    return _KERNELS[resolve_kernel(name)]


__all__ = [
    "DecodePlan",
    "Kernel",
    "KernelCall",
    "available_kernels",
    "get_kernel",
    "reference_attention",
    "register_kernel",
    "resolve_kernel",
    "torch_attention",
]
