"""The study's tables and plot, computed from finished run directories only (benchmarks/study.py)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from kpig_trainer.evaluation.report import read_report
from kpig_trainer.evaluation.runs import flips, instance_scores, load_run, paired_bootstrap
from kpig_trainer.fileio import atomic_write, atomic_write_text

PROBE_TASK = "task1599_smcalflow_classification"
TABLE1 = ("init", "sft", "lora", "replay_random", "entropy", "kpig", "multi")
TABLE2 = ("kpig", "kpig_ig_current", "kpig_wo_div", "kpig_wo_mask", "kpig_wo_jsd", "kpig_wo_temp")
COMPARISONS = (("kpig", "sft"), ("kpig", "replay_random"))
GROUPS = (("seen", "p_score"), ("seen", "v_score"), ("held_out", "p_score"), ("held_out", "v_score"))


def _stats(values: list[float | None]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {
        "mean": statistics.fmean(finite) if finite else None,
        "sd": statistics.stdev(finite) if len(finite) > 1 else None,
        "n": len(finite),
    }


def _fmt(stat: dict[str, Any] | None, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['sd']:.{digits}f}" if stat.get("sd") is not None else "")


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


def method_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Table-1 numbers of one method over its seeds: final-stage P/V per group, average, BWT, forgetting."""
    out: dict[str, Any] = {}
    for group, key in GROUPS:
        out[f"{group}_{key}"] = _stats([r["summary"].get(group, {}).get(key) for r in reports])
    for key in ("average_performance", "bwt", "forgetting"):
        out[key] = _stats([((r.get("matrix") or {}).get("metrics") or {}).get(key) for r in reports])
    return out


def initial_row(report: dict[str, Any], init: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's before-training row: its own, else that of the ``init`` run of the same seed (runs
    with ``eval_init: false`` leave it to that run: same model, same test sets)."""
    return report["matrix"].get("initial") or (init or {}).get("matrix", {}).get("initial")


def diagonal(reports: list[dict[str, Any]], inits: list[dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Per seen task: performance before training (init row) and right after its own stage."""
    result = {}
    matrix = reports[0]["matrix"]
    for task in matrix["seen"]:
        stage = matrix["task_stage"][task]
        own = [
            next(
                (
                    row["cells"].get(task, {}).get("performance")
                    for row in r["matrix"]["rows"]
                    if row["stage"] == stage
                ),
                None,
            )
            for r in reports
        ]
        before = [
            ((initial_row(r, i) or {}).get("cells", {}).get(task) or {}).get("performance")
            for r, i in zip(reports, inits)
        ]
        result[task] = {"stage": stage + 1, "init": _stats(before), "after_own_stage": _stats(own)}
    return result


def ig_curves(reports: list[dict[str, Any]], inits: list[dict[str, Any] | None]) -> dict[str, list]:
    """Mean IG per evaluation row over seeds: of the seen tasks trained so far (all seen tasks
    before training) and of the held-out tasks (None in rows that did not score them)."""
    per_seed = []
    for r, i in zip(reports, inits):
        first = initial_row(r, i)
        per_seed.append(([first] if first else []) + r["matrix"]["rows"])
    labels = [row["label"] for row in per_seed[0]]
    curves = {"labels": labels}
    for group, name in (("trained", "seen"), ("held_out", "held_out")):
        series = []
        for index in range(len(labels)):
            values = []
            for rows in per_seed:
                row = rows[index] if index < len(rows) else None
                summary = (row or {}).get("summary", {})
                if row is not None and row["stage"] is None:  # before training: every seen task
                    summary = {**summary, "trained": summary.get("seen", {})}
                values.append(summary.get(group, {}).get("ig"))
            series.append(_stats(values)["mean"])
        curves[f"{name}_ig"] = series
    return curves


def paired_differences(runs: dict[str, dict[int, Path]], replicates: int) -> list[dict[str, Any]]:
    """KPIG minus each baseline on the final row, paired by seed (same seed, same test sets)."""
    out = []
    for a, b in COMPARISONS:
        seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        if not seeds:
            continue
        pairs_by_group: dict[str, list] = {}
        records = {s: (load_run(runs[a][s]), load_run(runs[b][s])) for s in seeds}
        for seed, (ra, rb) in records.items():
            final = ra.rows[-1]
            sa, sb = instance_scores(ra, final), instance_scores(rb, final)
            for group in ("seen", "held_out"):
                pairs_by_group.setdefault(group, []).append((sa, sb))
        stream = next(iter(records.values()))[0].stream
        for group, key in GROUPS:
            tasks = list(stream.seen if group == "seen" else stream.held_out)
            if not tasks:
                continue
            result = paired_bootstrap(pairs_by_group[group], tasks, key, replicates=replicates, seed=0)
            out.append({"a": a, "b": b, "group": group, "score": key, "seeds": seeds, **result})
    return out


def flip_counts(runs: dict[int, Path]) -> dict[str, Any]:
    """Right-to-wrong and wrong-to-right test instances of already trained tasks, summed over stages."""
    per_seed = [flips(load_run(d)) for d in runs.values()]
    return {
        "right_to_wrong": _stats([sum(p["right_to_wrong"] for p in f) for f in per_seed]),
        "wrong_to_right": _stats([sum(p["wrong_to_right"] for p in f) for f in per_seed]),
        "compared": _stats([sum(p["compared"] for p in f) for f in per_seed]),
    }


def kpig_diagnostics(runs: dict[int, Path]) -> dict[str, Any]:
    """What the KPIG terms did during training, from ``logs/train.jsonl`` and ``logs/replay.jsonl``:
    the IG and temperature the steps saw, the JSD term's share of the loss, and the replay choices."""
    steps, replays = [], []
    for directory in runs.values():
        weight = json.loads((directory / "config.json").read_text())["training"].get("jsd_weight", 0.0)
        for line in (directory / "logs" / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "ce" in record and record.get("loss"):
                steps.append({**record, "jsd_share": weight * record.get("jsd", 0.0) / record["loss"]})
        path = directory / "logs" / "replay.jsonl"
        if path.exists():
            replays += [
                {"stage": r["stage"], "tasks": r["tasks"], "scores": r.get("scores", {})}
                for r in map(json.loads, path.read_text().splitlines())
            ]

    def spread(key: str) -> dict[str, Any]:
        values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
        return {**_stats(values), "min": min(values) if values else None, "max": max(values) if values else None}

    return {
        "steps": len(steps),
        "ig": spread("ig"),
        "temperature": spread("temperature"),
        "jsd": spread("jsd"),
        "jsd_share": spread("jsd_share"),
        "replay": replays,
    }


def probe_table(runs: dict[str, dict[int, Path]]) -> dict[str, Any]:
    """The misleading-constraint probe (Table 4 layout) on the final model of INIT, SFT, MULTI and KPIG."""
    from kpig_trainer.evaluation.probes import load_probe, misleading_constraint_probe
    from kpig_trainer.models import load_model_and_tokenizer

    probe = load_probe(PROBE_TASK)
    results = {}
    for method in ("init", "sft", "multi", "kpig"):
        if method not in runs:
            continue
        run = load_run(runs[method][min(runs[method])])
        if PROBE_TASK not in run.stream.tasks:
            return {}
        last = len(run.stream.stages)
        model_dir = run.root / "stages" / f"stage_{last:02d}" / "model"
        name = run.config["continual"]["model_name_or_path"] if method == "init" else str(model_dir)
        model, tokenizer = load_model_and_tokenizer(name)
        model.eval()
        task = run.stream.tasks[PROBE_TASK]
        for spec in probe.get("misleading_constraints", []):
            outcome = misleading_constraint_probe(
                model,
                tokenizer,
                task,
                run.stream.test[PROBE_TASK],
                spec["replace"],
                spec["old_labels"],
                spec["new_labels"],
                keep_predictions=False,
            )
            results.setdefault(
                spec["name"], {"old_labels": spec["old_labels"], "new_labels": spec["new_labels"], "methods": {}}
            )["methods"][method] = outcome
        del model
    return results


def plot_ig(curves: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, style in (("sft", "--"), ("kpig", "-")):
        if method not in curves:
            continue
        c = curves[method]
        for group, marker, name in (("seen", "o", "seen, trained so far"), ("held_out", "s", "held-out")):
            ax.plot(
                c["labels"],
                [math.nan if v is None else v for v in c[f"{group}_ig"]],
                style,
                marker=marker,
                label=f"{method}, {name}",
            )
    ax.set_ylabel("mean information gain")
    ax.set_title("IG over stages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_study_report(
    runs: dict[str, dict[int, Path]],
    out: Path,
    *,
    timings: dict[str, float] | None = None,
    probe: bool = True,
    replicates: int = 2000,
    environment: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``study.json``, ``study.md`` and ``ig_over_stages.png`` into ``out``; return their paths."""
    out = Path(out)
    reports = {m: [read_report(d) for _, d in sorted(seeds.items())] for m, seeds in runs.items()}
    init_by_seed = dict(zip(sorted(runs.get("init", {})), reports.get("init", [])))
    inits = {m: [init_by_seed.get(s) for s in sorted(seeds)] for m, seeds in runs.items()}
    first = next(iter(runs.values()))[min(next(iter(runs.values())))]
    config = json.loads((first / "config.json").read_text())
    study: dict[str, Any] = {
        "runs": {m: {str(s): str(d) for s, d in seeds.items()} for m, seeds in runs.items()},
        "sizes": {
            **{
                k: config["continual"].get(k)
                for k in (
                    "model_name_or_path",
                    "benchmark",
                    "order",
                    "max_stages",
                    "max_held_out_tasks",
                    "max_train_instances",
                    "max_test_instances",
                    "test_size",
                    "test_sampling",
                    "eval_tasks",
                )
            },
            **{
                k: config["training"].get(k)
                for k in (
                    "learning_rate",
                    "num_train_epochs",
                    "per_device_train_batch_size",
                    "max_length",
                    "alpha",
                    "jsd_weight",
                    "replay_tasks",
                    "replay_instances",
                )
            },
        },
        "stream": {
            "seen": reports[next(iter(reports))][0]["matrix"]["seen"],
            "held_out": reports[next(iter(reports))][0]["matrix"]["held_out"],
        },
        "methods": {m: method_summary(r) for m, r in reports.items()},
        "diagonal": {m: diagonal(reports[m], inits[m]) for m in ("sft", "kpig") if m in reports},
        "paired": paired_differences(runs, replicates),
        "ig_curves": {m: ig_curves(reports[m], inits[m]) for m in ("sft", "kpig") if m in reports},
        "flips": {m: flip_counts(seeds) for m, seeds in runs.items() if m != "init"},
        "probe": probe_table(runs) if probe else {},
        "diagnostics": {m: kpig_diagnostics(seeds) for m, seeds in runs.items() if m.startswith("kpig")},
        "timings": dict(timings or {}),
        "environment": dict(environment or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / "study.json", json.dumps(study, indent=2) + "\n")]
    if study["ig_curves"]:
        plot_ig(study["ig_curves"], out / "ig_over_stages.png")
        written.append(out / "ig_over_stages.png")
    written.append(atomic_write_text(out / "study.md", render_markdown(study)))
    return written


LEGEND = (
    "Values are mean ± standard deviation over seeds (no ± with one seed). P: P-score, V: V-score "
    "(lower is better), both 0-100, after the final stage. AP: average performance on the seen "
    "tasks; BWT: backward transfer; F: forgetting."
)


def headline_lines(study: dict[str, Any], level: str = "##") -> list[str]:
    """Table 1, the paired differences and Table 2, as markdown lines."""
    methods = study["methods"]
    lines = [f"{level} Table 1 layout", ""]
    header = ["Method", "Seeds", "Seen P", "Seen V", "Held-out P", "Held-out V", "AP", "BWT", "F"]
    rows = [
        [
            m,
            str(methods[m]["seen_p_score"]["n"]),
            *(_fmt(methods[m][f"{g}_{k}"]) for g, k in GROUPS),
            _fmt(methods[m]["average_performance"]),
            _fmt(methods[m]["bwt"]),
            _fmt(methods[m]["forgetting"]),
        ]
        for m in TABLE1
        if m in methods
    ]
    lines += _table(header, rows)
    if study["paired"]:
        lines += [f"{level} Paired differences (final stage, bootstrap 95% interval over test instances)", ""]
        lines += _table(
            ["Difference", "Group", "Score", "Seeds", "Value", "95% interval"],
            [
                [
                    f"{p['a']} − {p['b']}",
                    p["group"].replace("_", "-"),
                    p["score"],
                    str(len(p["seeds"])),
                    f"{p['difference']:.1f}",
                    "-" if p["low"] is None else f"[{p['low']:.1f}, {p['high']:.1f}]",
                ]
                for p in study["paired"]
            ],
        )
    ablations = [m for m in TABLE2 if m in methods]
    if ablations:
        lines += [f"{level} Table 2 layout (ablations)", ""]
        lines += _table(
            ["Method", "Seen P", "Seen V", "Held-out P", "Held-out V"],
            [[m, *(_fmt(methods[m][f"{g}_{k}"]) for g, k in GROUPS)] for m in ablations],
        )
    return lines


def environment_lines(study: dict[str, Any]) -> list[str]:
    """The command, the machine and the wall time."""
    env, timings = study.get("environment") or {}, study["timings"]
    lines = []
    if env.get("command"):
        lines += [f"Command: `python {env['command']}`, then `python benchmarks/study.py report`.", ""]
    if env.get("cpu"):
        lines += [
            f"Hardware: {env['cpu']}, {env['cores']} cores ({env['torch_threads']} torch threads), "
            f"GPU: {env['gpu'] or 'none'}; torch {env['torch']}, Python {env['python']}.",
            "",
        ]
    if timings:
        total = sum(timings.values())
        lines += [
            f"Wall time of the runs: {total / 60:.1f} min in all "
            f"({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())} min).",
            "",
        ]
    return lines


def readme_block(study: dict[str, Any]) -> str:
    """The README's study block: sizes, the machine and time, and the headline tables."""
    lines = [
        "",
        "Sizes: " + ", ".join(f"{k} {v}" for k, v in study["sizes"].items()) + ".",
        "",
        *environment_lines(study),
        LEGEND,
        "",
        *headline_lines(study, level="####"),
        "The per-task diagonal, per-example forgetting, the misleading-constraint probe, what the KPIG terms "
        "did and the IG plot: [benchmarks/results/study/study.md](benchmarks/results/study/study.md).",
        "",
    ]
    return "\n".join(lines)


def render_markdown(study: dict[str, Any]) -> str:
    lines = [
        "# KPIG study",
        "",
        "Sizes: " + ", ".join(f"{k} {v}" for k, v in study["sizes"].items()) + ".",
        f"Seen tasks (stage order): {', '.join(study['stream']['seen'])}.",
        f"Held-out tasks: {', '.join(study['stream']['held_out'])}.",
        "",
        LEGEND,
        "",
        *headline_lines(study),
    ]
    for method, tasks in study["diagonal"].items():
        lines += [f"## Does {method} learn each task? (performance before training and right after its stage)", ""]
        lines += _table(
            ["Task", "Stage", "Before", "After its stage"],
            [[t, str(v["stage"]), _fmt(v["init"]), _fmt(v["after_own_stage"])] for t, v in tasks.items()],
        )
    if study["flips"]:
        lines += ["## Per-example forgetting (test instances of already trained tasks, summed over stages)", ""]
        lines += _table(
            ["Method", "Right → wrong", "Wrong → right", "Compared"],
            [
                [m, _fmt(f["right_to_wrong"]), _fmt(f["wrong_to_right"]), _fmt(f["compared"])]
                for m, f in study["flips"].items()
            ],
        )
    for name, spec in study["probe"].items():
        methods_ = list(spec["methods"])
        labels = [*spec["old_labels"], *spec["new_labels"]]
        lines += [f"## Misleading constraint `{name}` on {PROBE_TASK} (Table 4 layout: % of answers)", ""]
        body = [
            [
                label + (" (required)" if label in spec["new_labels"] else ""),
                *(f"{spec['methods'][m]['rates'].get(label, 0):.1f}" for m in methods_),
            ]
            for label in labels
        ]
        body.append(["other", *(f"{spec['methods'][m]['rates'].get('other', 0):.1f}" for m in methods_)])
        body.append(
            [
                "IG",
                *(
                    "-" if spec["methods"][m].get("ig") is None else f"{spec['methods'][m]['ig']:.3f}"
                    for m in methods_
                ),
            ]
        )
        lines += _table(["Response", *methods_], body)
    if study["diagnostics"]:
        lines += ["## What the KPIG terms did (training logs, every step of every seed)", ""]
        lines += _table(
            ["Method", "Steps", "IG mean ± sd [min, max]", "Temperature [min, max]", "JSD share of loss"],
            [
                [
                    m,
                    str(d["steps"]),
                    f"{_fmt(d['ig'], 4)} [{_num(d['ig']['min'])}, {_num(d['ig']['max'])}]",
                    f"[{_num(d['temperature']['min'])}, {_num(d['temperature']['max'])}]",
                    f"{_fmt(d['jsd_share'], 4)} (max {_num(d['jsd_share']['max'])})",
                ]
                for m, d in study["diagnostics"].items()
            ],
        )
        for m, d in study["diagnostics"].items():
            if d["replay"]:
                lines += [f"Replay of {m} (stage: chosen tasks, lowest score first):", ""]
                lines += [
                    f"- stage {r['stage']}: "
                    + ", ".join(f"{t} ({r['scores'][t]:.4f})" if t in r["scores"] else t for t in r["tasks"])
                    for r in d["replay"]
                ]
                lines += [""]
    if study["ig_curves"]:
        lines += ["## IG over stages (first seed)", "", "![IG over stages, SFT vs KPIG](ig_over_stages.png)", ""]
    lines += environment_lines(study)
    return "\n".join(lines)
