"""Each method's effect on hallucination in the toy world: ``builtin:toy-llava`` on ``builtin:shapes``.

For vanilla and every method that ``mitigate.list_methods()`` reports at run time: the method's defaults
for this model (layer ranges mapped to its 6 language layers, see SETTINGS) plus a small grid over its main
strength parameter. It is one call of ``mitigate compare``'s engine
(:func:`mitigate.evals.compare.run_compare`): each setting runs POPE (3 splits, 900 questions each) and
CHAIR (200 captions), cached and resumable in ``--runs``, and is compared with vanilla by a paired
bootstrap over the same questions / images; this script adds only the grid and the toy world's false-yes
rates. Writes ``toy_efficacy.json``, ``.md`` and ``.png``.

This is toy-world evidence: a 1.8M-parameter model trained on synthetic scenes where hallucination comes
from one known cause (co-occurrence priors over partly hidden objects). A method that helps here may not
help a real VLM and the reverse; the table says what each method does in this world, whatever that is.

    python benchmarks/toy_efficacy.py                      # everything (tens of minutes on 2 CPU cores)
    python benchmarks/toy_efficacy.py --methods var --limit 60   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mitigate import list_methods
from mitigate.builtin import toy_world
from mitigate.evals.coco import open_data
from mitigate.evals.compare import Benchmark, Column, Setting, run_compare, write_compare
from mitigate.evals.tasks import ChairTask, PopeTask

MODEL = "builtin:toy-llava"
DATA = "builtin:shapes"
HERE = Path(__file__).resolve().parent

# Per method: fixed overrides for this model, the strength parameter, and its grid (the default included).
# Layer ranges left out are the methods' own defaults scaled from LLaVA-1.5-7B's 32 layers to 6 (see each
# method's `default_layers`); the resolved values are written into the JSON.
SETTINGS: dict[str, dict[str, Any]] = {
    # VAR: preset var-toy (configs/var.yaml) is picked for this model by name: its sink dims and tau come
    # from `mitigate calibrate --model builtin:toy-llava`. Grid around the released moved fraction 0.4.
    "var": {"fixed": {}, "param": "moved_fraction", "grid": [0.2, 0.4, 0.6, 0.8]},
    # GIFT: layer 11 of 32 maps to layer 2 of 6 and 12..22 to 2..4; enhancement must follow the saliency
    # layer (it is read in the same pass), so saliency [2], enhancement [3, 4]. Grid around alpha 5.
    "gift": {
        "fixed": {"saliency_layers": [2], "enhance_layers": [3, 4]},
        "param": "alpha",
        "grid": [2.5, 5.0, 10.0],
    },
    # VHR: layer 1 plus the last 14/32 of the depth (the method's scaling). Grid around alpha 2.
    "vhr": {"fixed": {}, "param": "alpha", "grid": [1.5, 2.0, 3.0]},
    # PAINT: layers 2..last (the method's default). Grid around alpha 0.7 (beta stays 0.4).
    "paint": {"fixed": {}, "param": "alpha", "grid": [0.35, 0.7, 1.4]},
    # PAI: layers 2..last, no contrast (the method's default). Grid around alpha 0.5.
    "pai": {"fixed": {}, "param": "alpha", "grid": [0.25, 0.5, 1.0]},
    # VAF: 9..14 of 32 maps to 2..3 of 6 (the method's scaling). Grid around the image scale 1.15.
    "vaf": {"fixed": {}, "param": "image_scale", "grid": [1.08, 1.15, 1.3]},
}
DEFAULTS = {"var": 0.4, "gift": 5.0, "vhr": 2.0, "paint": 0.7, "pai": 0.5, "vaf": 1.15}

# The table's columns (rates); "fyr" = false-yes rate = FP / (FP + TN), from PopeFalseYes below.
COLUMNS = [
    Column("pope.random.accuracy", "acc rand"),
    Column("pope.adversarial.accuracy", "acc adv"),
    Column("pope.mean_f1", "mean F1"),
    Column("fyr.random.false_yes", "FYR rand", lower_is_better=True),
    Column("fyr.adversarial.false_yes", "FYR adv", lower_is_better=True),
    Column("fyr.adversarial.false_yes_partner", "FYR adv partner", lower_is_better=True),
    Column("chair.chair_i", "CHAIR_i", lower_is_better=True),
    Column("chair.chair_s", "CHAIR_s", lower_is_better=True),
    Column("chair.recall", "recall"),
]
NOTE = (
    "Toy-world evidence only: a small LLaVA trained by this project on synthetic scenes in which "
    "hallucination has one known cause (co-occurrence priors over partly hidden objects). It shows what each "
    "method does to that failure, not how it does on real VLMs."
)
LEGEND = (
    "FYR = false-yes rate on the split's absent objects; 'FYR adv partner' = on adversarial questions about "
    "the absent partner of a present pair member."
)
_QUESTION = re.compile(r"^Is there an? (.+) in the image\?$")


class PopeFalseYes:
    """POPE false-yes rates per split, overall and on absent partners of a present pair member, as a task
    for :func:`paired_bootstrap` (stats: fp, tn, fp on partners, tn on partners)."""

    objects: ClassVar[dict[str, set[str]]] = {}  # image file -> objects, set before use

    @classmethod
    def stats(cls, record: dict[str, Any]) -> tuple[str, np.ndarray]:
        out = np.zeros(4)
        if record["label"] == "no":
            obj = _QUESTION.match(record["question"]).group(1)
            partner = toy_world.PARTNER.get(obj) in cls.objects[record["image"]]
            yes = record["pred"] == "yes"
            out[0 if yes else 1] += 1
            if partner:
                out[2 if yes else 3] += 1
        return record["split"], out

    @staticmethod
    def metrics(sums: dict[str, np.ndarray]) -> dict[str, Any]:
        def rate(a, b):
            return np.divide(a, a + b, out=np.zeros(np.broadcast(a, b).shape), where=(a + b) > 0)

        out = {}
        for split, s in sums.items():
            s = np.moveaxis(np.asarray(s, dtype=float), -1, 0)
            out[split] = {"false_yes": rate(s[0], s[1]), "false_yes_partner": rate(s[2], s[3])}
        return out


def settings(methods: list[str]) -> list[Setting]:
    out = [Setting("vanilla")]
    for name in methods:
        spec = SETTINGS.get(name)
        if spec is None:  # a method added after this script: its defaults only
            out.append(Setting(f"{name} (defaults)", name))
            continue
        for value in spec["grid"]:
            default = " (default)" if value == DEFAULTS.get(name) else ""
            out.append(
                Setting(
                    f"{name} {spec['param']}={value}{default}", name, {**spec["fixed"], spec["param"]: value}
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", help="default: every method registered now")
    parser.add_argument("--model", default=MODEL, help="a folder written by toy_train (default: shipped)")
    parser.add_argument("--runs", type=Path, default=Path("runs/toy_efficacy"), help="run folders (cache)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where toy_efficacy.* go")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per split (quick look)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="CHAIR caption length")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(2)
    available = list_methods()
    methods = args.methods if args.methods is not None else available
    missing = sorted(m for m in SETTINGS if m not in available)
    data = open_data(DATA, None)
    PopeFalseYes.objects = {
        img["file_name"]: set(data.objects()[i]) for i, img in data.coco("instances").imgs.items()
    }
    benchmarks = [
        Benchmark("pope", PopeTask(data, limit=args.limit), extra={"fyr": PopeFalseYes}),
        Benchmark("chair", ChairTask(data, limit=args.limit), max_new_tokens=args.max_new_tokens),
    ]
    started = time.time()
    report = run_compare(
        args.model,
        settings(methods),
        benchmarks,
        args.runs,
        run_options={"batch_size": args.batch_size, "progress": False},
        resamples=args.resamples,
        columns=COLUMNS,
    )
    assert report is not None
    note = NOTE
    if missing and args.methods is None:
        note += f" Methods this script has no grid for (defaults run): {', '.join(missing)}."
    report.update(
        {
            "data": DATA,
            "note": note,
            "methods_available": available,
            "missing": [m for m in missing if args.methods is None],
            "limit": args.limit,
            "chair_max_new_tokens": args.max_new_tokens,
            # cached settings are not rerun, so this is the time of this invocation only
            "seconds_this_invocation": round(time.time() - started, 1),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
    )
    title = "Toy-world efficacy: builtin:toy-llava on builtin:shapes"
    paths = write_compare(report, args.out, name="toy_efficacy", title=title, note=note, legend=LEGEND)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
