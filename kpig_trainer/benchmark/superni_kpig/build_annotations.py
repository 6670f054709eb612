"""Refresh the data-derived fields of annotations.json; keep the hand-written ones.

Usage (plain python3, no dependencies):

    python3 build_annotations.py [--tables PATH] [--check]

Derived fields (recomputed on every run): paper_name, category, usage, metric, scope,
format (all from the KPIG paper's tables 7-9, via kpig_tables.json) and max_words (from
the task's reference outputs, see README.md). Hand-written fields (labels, format_spec,
key_parts, notes, labels_from_input) are kept as they are; a new task gets empty ones.
`--check` also validates the hand-written fields against the task files.
"""

import argparse
import ast
import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TABLES = HERE.parents[2] / "tests" / "data" / "kpig_tables.json"  # the paper's tables 7-9
DERIVED = ("paper_name", "category", "usage", "metric", "scope", "format")
HAND_DEFAULTS = {"labels": [], "format_spec": None, "key_parts": [], "notes": ""}


def normalise(text):
    return text.strip().casefold().rstrip(".").strip()


def reference_outputs(task):
    return [out for inst in task["Instances"] for out in inst["output"]]


def max_words(outputs, fmt):
    """Wordy threshold: max(3, ceil(1.5 * p95 of reference word counts)); n for Length <= n."""
    limit = re.fullmatch(r"Length <= (\d+)", fmt)
    if limit:
        return int(limit.group(1))
    counts = sorted(len(o.split()) for o in outputs)
    rank = 0.95 * (len(counts) - 1)  # linear interpolation between closest ranks
    lo, hi = math.floor(rank), math.ceil(rank)
    p95 = counts[lo] + (counts[hi] - counts[lo]) * (rank - lo)
    return max(3, math.ceil(1.5 * p95))


def satisfies(spec, text):
    """True when a reference output obeys a format_spec (the same test a scorer would use)."""
    kind, text = spec["type"], text.strip()
    if kind in ("list", "2d_list"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return False
        inner_lists = [isinstance(item, list) for item in value] if isinstance(value, list) else [True]
        wanted = kind == "2d_list"
        return isinstance(value, list) and all(flag == wanted for flag in inner_lists)
    if kind == "split":
        return all(part.strip() for part in text.split(spec["delimiter"]))
    if kind == "number":
        return re.fullmatch(r"-?\d+(\.\d+)?", text) is not None
    if kind == "json":
        try:
            json.loads(text)
            return True
        except ValueError:
            return False
    if kind == "uppercase_letter":
        return re.fullmatch(r"[A-Z]", text) is not None
    if kind == "max_words":
        return len(text.split()) <= spec["n"]
    if kind == "one_answer":
        return bool(text) and "\n" not in text
    if kind == "contains":
        return spec["text"] in text
    if kind == "pattern":
        return re.fullmatch(spec["regex"], text, re.DOTALL) is not None
    raise ValueError(f"unknown format_spec type {kind!r}")


def check(name, entry, task):
    problems = []
    definition = task["Definition"][0]
    for span in entry["key_parts"]:
        if not span.strip() or span not in definition or span.strip() == definition.strip():
            problems.append(f"key part not a proper verbatim span: {span!r}")
    outputs = reference_outputs(task)
    if entry["scope"] == "In choice":
        labels = {normalise(label) for label in entry["labels"]}
        stray = sorted({o for o in outputs if normalise(o) not in labels})
        if not labels:
            problems.append("In choice task without labels")
        elif stray and not entry.get("labels_from_input"):
            problems.append(f"outputs outside labels: {stray[:5]}")
    if entry["format_spec"] is not None:
        bad = [o for o in outputs if not satisfies(entry["format_spec"], o)]
        if bad:
            problems.append(f"{len(bad)} outputs break format_spec: {bad[:3]}")
    return [f"{name}: {p}" for p in problems]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=Path, default=DEFAULT_TABLES)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    path = HERE / "annotations.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if args.tables.exists():
        tables = {row["file"].removesuffix(".json"): row for row in json.loads(args.tables.read_text())}
    else:  # no copy of the paper's tables here: keep the derived fields already in the file
        print(f"{args.tables} not found; keeping the paper fields already in annotations.json")
        tables = old
    tasks = {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "tasks").glob("*.json"))}

    out, problems = {}, []
    for name in sorted(tasks):
        entry = {**HAND_DEFAULTS, **old.get(name, {})}
        source = tables.get(name) or old.get(name, {})  # a task outside the paper keeps its own
        missing = [field for field in DERIVED if field not in source]
        if missing:
            raise SystemExit(
                f"{name}: no {', '.join(missing)}; add a tables row or write them into its annotations.json entry"
            )
        entry.update({field: source[field] for field in DERIVED})
        entry["max_words"] = max_words(reference_outputs(tasks[name]), entry["format"])
        out[name] = entry
        if args.check:
            problems += check(name, out[name], tasks[name])

    path.write_text(json.dumps(out, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {path.name}: {len(out)} tasks, {sum(bool(e['key_parts']) for e in out.values())} with key parts")
    for problem in problems:
        print(problem)


if __name__ == "__main__":
    main()
