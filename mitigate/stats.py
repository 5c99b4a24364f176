"""Optional per-layer statistics of what the edits did, accumulated on device without synchronising."""

from __future__ import annotations

from collections import defaultdict

import torch


class Stats:
    """Sums of named quantities per (method, layer). Reading them (:meth:`summary`) is the only sync."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, int], dict[str, torch.Tensor]] = defaultdict(dict)

    def add(self, method: str, layer: int, **values: torch.Tensor) -> None:
        slot = self._sums[(method, layer)]
        for key, value in values.items():
            value = value.detach().to(torch.float64).sum()
            slot[key] = value if key not in slot else slot[key] + value

    def summary(self) -> dict[str, dict[int, dict[str, float]]]:
        out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
        for (method, layer), slot in sorted(self._sums.items()):
            out[method][layer] = {k: float(v) for k, v in slot.items()}
        return dict(out)

    def clear(self) -> None:
        self._sums.clear()
