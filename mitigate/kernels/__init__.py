"""Executors of an :class:`~mitigate.kernels.edit.AttentionEdit`, by name.

Every kernel has the signature of :func:`~mitigate.kernels.reference.reference_attention` and gives its
numbers (fp32 within 1e-5, bf16 within 2e-2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .edit import AttentionEdit, HeadScale, LogitEdit, MassTransfer, combine
from .reference import reference_attention
from .torch_sdpa import torch_attention

Kernel = Callable[..., torch.Tensor]

_KERNELS: dict[str, Kernel] = {"reference": reference_attention, "torch": torch_attention}


def register_kernel(name: str, fn: Kernel) -> None:
    _KERNELS[name] = fn


def available_kernels() -> list[str]:
    return ["auto", *sorted(_KERNELS)]


def resolve_kernel(name: str, device: torch.device | str | None = None) -> str:
    """The concrete kernel name for ``name`` on ``device`` (``auto`` picks the fastest correct one)."""
    if name == "auto":
        return "torch" if "torch" in _KERNELS else "reference"
    if name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose one of {available_kernels()}")
    return name


def get_kernel(name: str) -> Kernel:
    return _KERNELS[resolve_kernel(name)]


__all__ = [
    "AttentionEdit",
    "HeadScale",
    "LogitEdit",
    "MassTransfer",
    "available_kernels",
    "combine",
    "get_kernel",
    "reference_attention",
    "register_kernel",
    "resolve_kernel",
]
