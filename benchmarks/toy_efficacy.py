"""Each method's effect on hallucination in the toy world: ``builtin:toy-llava`` on ``builtin:shapes``.

For vanilla and every method that ``mitigate.list_methods()`` reports at run time: the method's defaults
for this model (layer ranges mapped to its 6 language layers, see SETTINGS) plus a small grid over its main
strength parameter. Each setting runs POPE (3 splits, 900 questions each) and CHAIR (200 captions) through
``mitigate.evals.evaluate`` (cached and resumable in ``--runs``), and is compared with vanilla by a paired
bootstrap over the same questions / images. Writes ``toy_efficacy.json``, ``.md`` and ``.png``.

This is toy-world evidence: a 1.8M-parameter model trained on synthetic scenes where hallucination comes
from one known cause (co-occurrence priors over partly hidden objects). A method that helps here may not
help a real VLM and the reverse; the table says what each method does in this world, whatever that is.

    python benchmarks/toy_efficacy.py                      # everything (tens of minutes on 2 CPU cores)
    python benchmarks/toy_efficacy.py --methods var --limit 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mitigate import list_methods
from mitigate.builtin import toy_world
from mitigate.evals.bootstrap import paired_bootstrap
from mitigate.evals.coco import open_data
from mitigate.evals.evaluate import RunConfig, evaluate
from mitigate.evals.results import load_run
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

# Columns of the tables: (key, header). Rates; "fyr" = false-yes rate = FP / (FP + TN).
COLUMNS = [
    ("pope.random.accuracy", "acc rand"),
    ("pope.adversarial.accuracy", "acc adv"),
    ("pope.mean_f1", "mean F1"),
    ("fyr.random.false_yes", "FYR rand"),
    ("fyr.adversarial.false_yes", "FYR adv"),
    ("fyr.adversarial.false_yes_partner", "FYR adv partner"),
    ("chair.chair_i", "CHAIR_i"),
    ("chair.chair_s", "CHAIR_s"),
    ("chair.recall", "recall"),
]
LOWER_IS_BETTER = {"fyr", "chair.chair_i", "chair.chair_s"}
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


def settings(methods: list[str]) -> list[dict[str, Any]]:
    out = [{"label": "vanilla", "method": "vanilla", "sets": {}}]
    for name in methods:
        spec = SETTINGS.get(name)
        if spec is None:  # a method added after this script: its defaults only
            out.append({"label": f"{name} (defaults)", "method": name, "sets": {}, "default": True})
            continue
        for value in spec["grid"]:
            sets = {**spec["fixed"], spec["param"]: value}
            default = value == DEFAULTS.get(name)
            label = f"{name} {spec['param']}={value}" + (" (default)" if default else "")
            out.append({"label": label, "method": name, "sets": sets, "default": default})
    return out


def run_one(task_name: str, setting: dict[str, Any], args, data) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "-", setting["label"]).strip("-")
    out = args.runs / f"{task_name}-{slug}"
    task = (PopeTask if task_name == "pope" else ChairTask)(data, limit=args.limit)
    cfg = RunConfig(
        model=args.model,
        method=setting["method"],
        sets=setting["sets"],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens if task_name == "chair" else None,
        out=out,
        progress=False,
    )
    started = time.time()
    results = evaluate(task, cfg)
    print(f"  {task_name:5s} {setting['label']}: {time.time() - started:.0f}s", flush=True)
    assert results is not None
    return out


def summarize(runs: dict[str, dict[str, Path]], args) -> dict[str, Any]:
    base = {t: load_run(runs["vanilla"][t]) for t in ("pope", "chair")}
    rows = []
    for label, folders in runs.items():
        pope_res, pope_rec = load_run(folders["pope"])
        chair_res, chair_rec = load_run(folders["chair"])
        comparisons = {
            "pope": paired_bootstrap(PopeTask, base["pope"][1], pope_rec, resamples=args.resamples),
            "fyr": paired_bootstrap(PopeFalseYes, base["pope"][1], pope_rec, resamples=args.resamples),
            "chair": paired_bootstrap(ChairTask, base["chair"][1], chair_rec, resamples=args.resamples),
        }
        metrics = {}
        for group, comp in comparisons.items():
            for name, m in comp["metrics"].items():
                metrics[f"{group}.{name}"] = {
                    "value": m["method"],
                    "ci": m["ci_method"],
                    "delta": m["delta"],
                    "delta_ci": m["ci"],
                }
        rows.append(
            {
                "label": label,
                "method": pope_res["method"]["spec"],
                "sets": pope_res["method"]["sets"],
                "resolved": pope_res["method"]["resolved"],
                "presets": pope_res["method"]["presets"],
                "n_pope": pope_res["n_scored"],
                "n_chair": chair_res["n_scored"],
                "metrics": metrics,
            }
        )
    return {"rows": rows}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# Toy-world efficacy: builtin:toy-llava on builtin:shapes",
        "",
        report["note"],
        "",
        f"Rates in %, with {int(100 * report['confidence'])}% bootstrap intervals ({report['resamples']} "
        "resamples; POPE resampled within each split). FYR = false-yes rate on the split's absent objects; "
        "'FYR adv partner' = on adversarial questions about the absent partner of a present pair member.",
        "",
        "## Values",
        "",
        "| setting | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            m = row["metrics"][key]
            cells.append(f"{pct(m['value'])} [{pct(m['ci'][0])}, {pct(m['ci'][1])}]")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Change against vanilla (paired)",
        "",
        "Points; **bold** where the interval excludes 0 (better or worse). "
        "For FYR and CHAIR lower is better.",
        "",
        "| setting | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows[1:]:
        cells = []
        for key, _ in COLUMNS:
            m = row["metrics"][key]
            text = f"{100 * m['delta']:+.1f} [{100 * m['delta_ci'][0]:+.1f}, {100 * m['delta_ci'][1]:+.1f}]"
            significant = m["delta_ci"][0] > 0 or m["delta_ci"][1] < 0
            cells.append(f"**{text}**" if significant else text)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings", ""]
    for row in rows[1:]:
        lines.append(f"- {row['label']}: `{json.dumps(row['resolved'], sort_keys=True)}`")
    if report["missing"]:
        lines += [
            "",
            f"Methods without an entry in this script (defaults run): {', '.join(report['missing'])}.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = [c for c in COLUMNS if c[0] in {k for k, _ in COLUMNS[1:]}]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab10").colors[i % 10] for i, m in enumerate(methods)}
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for i, row in enumerate(rows):
            m = row["metrics"][key]
            value = 100 * m["value"]
            err = [[value - 100 * m["ci"][0]], [100 * m["ci"][1] - value]]
            ax.bar(i, value, color=colors[row["method"]], yerr=err, capsize=2)
        ax.axhline(100 * rows[0]["metrics"][key]["value"], color="black", lw=0.8, ls="--")
        lower = any(key.startswith(p) for p in LOWER_IS_BETTER)
        ax.set_title(f"{title} ({'lower' if lower else 'higher'} is better)", fontsize=9)
        ax.set_xticks(range(len(rows)), [r["label"].replace(" (default)", "*") for r in rows], rotation=60,
                      ha="right", fontsize=6)  # fmt: skip
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        "builtin:toy-llava on builtin:shapes: toy-world evidence (95% bootstrap intervals; * = default)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    started = time.time()
    runs: dict[str, dict[str, Path]] = {}
    for setting in settings(methods):
        print(setting["label"], flush=True)
        runs[setting["label"]] = {t: run_one(t, setting, args, data) for t in ("pope", "chair")}
    report = summarize(runs, args)
    report.update(
        {
            "model": args.model,
            "data": DATA,
            "note": (
                "Toy-world evidence only: a small LLaVA trained by this project on synthetic scenes in "
                "which hallucination has one known cause (co-occurrence priors over partly hidden objects). "
                "It shows what each method does to that failure, not how it does on real VLMs."
            ),
            "methods_available": available,
            "missing": [m for m in missing if args.methods is None],
            "confidence": 0.95,
            "resamples": args.resamples,
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "toy_efficacy.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "toy_efficacy.md").write_text(markdown(report))
    plot(report, args.out / "toy_efficacy.png")
    print((args.out / "toy_efficacy.md").read_text())


if __name__ == "__main__":
    main()
