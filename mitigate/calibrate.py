"""Find a model's massive-activation ("sink") dimensions, for VAR's ``sink_dims``.

For each prompt and language layer, the hidden state entering the layer is RMS-normalised without its
learned weight (as VAR does) and, per dimension, the largest absolute value over the prompt's tokens is
taken. A dimension's score in a layer is that value; its top dimensions per layer are counted across
layers, and the dims that are on top in the most layers (ties: higher mean score) are recommended.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .methods.var import RMS_EPS


@dataclass
class Calibration:
    per_layer: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # layer -> [(dim, score)]
    recommended: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "recommended_sink_dims": self.recommended,
            "layers_on_top": {str(d): c for d, c in self.counts.items()},
            "per_layer": {str(k): [[d, round(s, 3)] for d, s in v] for k, v in self.per_layer.items()},
        }


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, top: int = 2, first_layer: int = 2
) -> Calibration:
    """Score dimensions over ``batches`` (processor outputs) and recommend ``top`` sink dims."""
    scores: dict[int, torch.Tensor] = {}
    for inputs in batches:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        for layer, h in enumerate(
            hidden[:-1]
        ):  # hidden[i] enters layer i; the last is the final norm's input
            if layer < first_layer:
                continue
            h = h.float()
            normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)).abs()
            if valid is not None:
                normed = normed * valid[..., None]
            best = normed.amax(dim=(0, 1)).cpu()
            scores[layer] = best if layer not in scores else torch.maximum(scores[layer], best)
    result = Calibration()
    counts: Counter[int] = Counter()
    totals: Counter[int] = Counter()
    for layer, best in sorted(scores.items()):
        values, dims = best.topk(top)
        result.per_layer[layer] = [(int(d), float(v)) for d, v in zip(dims, values, strict=True)]
        for d, v in zip(dims.tolist(), values.tolist(), strict=True):
            counts[d] += 1
            totals[d] += v
    ranked = sorted(counts, key=lambda d: (-counts[d], -totals[d] / counts[d]))
    result.recommended = ranked[:top]
    result.counts = {d: counts[d] for d in ranked}
    return result
