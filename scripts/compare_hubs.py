"""Good and bad hubs of several runs side by side, e.g. before and after training with NeighborRetr:

    python scripts/compare_hubs.py --runs outputs/infonce/<time> outputs/neighborretr/<time> \\
        --labels InfoNCE NeighborRetr --out hub_comparison

Each run folder (a training run or a neighborretr-eval folder) must hold the `<name>_hubs_<direction>.json`
files that every evaluation writes (eval.hub_report=true, the default). Writes `<out>.png` (one row per
direction and method: the runs' k-occurrence histograms overlaid, then each run's N_k against correct-share
scatter, good hubs green and bad hubs red) and `<out>.md` (one table line per run, direction and method), and
prints the table. A missing file stops with a one-line "error: ..." and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from matplotlib.figure import Figure

from neighborretr.eval.hub_report import HubCounts, counts_from_report, draw_hub_scatter
from neighborretr.eval.hubness_metrics import draw_k_occurrence

DIRECTIONS = ("t2v", "v2t")
COLUMNS = (
    ("hubs", "n_hubs", "{}"),
    ("good", "n_good_hubs", "{}"),
    ("bad", "n_bad_hubs", "{}"),
    ("slots at hubs", "hub_slot_share", "{:.1%}"),
    ("correct slots", "correct_share", "{:.1%}"),
    ("wrong at hubs", "wrong_to_hubs", "{:.1%}"),
    ("wrong at bad hubs", "wrong_to_bad_hubs", "{:.1%}"),
)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run or eval folders, two or more")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the folder names)")
    p.add_argument("--name", default="test", help="the evaluated split, the <name> of <name>_hubs_*.json")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    p.add_argument("--methods", nargs="+", default=["none"], help="normalisations to compare (default: raw)")
    p.add_argument("--out", type=Path, default=Path("hub_comparison"), help="writes <out>.png and <out>.md")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        fail("--runs needs two or more run folders")
    if args.labels is not None and len(args.labels) != len(args.runs):
        fail(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    return args


def load(runs: list[Path], labels: list[str], name: str, directions: list[str]) -> dict[str, dict[str, dict]]:
    """{label: {direction: the run's <name>_hubs_<direction>.json}}."""
    reports: dict[str, dict[str, dict]] = {}
    for run, label in zip(runs, labels):
        reports[label] = {}
        for direction in directions:
            path = run / f"{name}_hubs_{direction}.json"
            if not path.is_file():
                fail(f"{path} not found: evaluate the run with eval.hub_report=true (or pass --name/--directions)")
            reports[label][direction] = json.loads(path.read_text())
    return reports


def method_counts(reports: dict, direction: str, method: str) -> dict[str, HubCounts]:
    """{label: HubCounts} of one direction and method; a run without that method stops the script."""
    counts = {}
    for label, by_direction in reports.items():
        methods = by_direction[direction]["methods"]
        if method not in methods:
            fail(f"run {label!r} has no {method!r} hub report in {direction}; it has {', '.join(methods)}")
        counts[label] = counts_from_report(methods[method])
    return counts


def draw(reports: dict, directions: list[str], methods: list[str], path: Path) -> Path:
    """One row per (direction, method): overlaid k-occurrence histograms, then one hub scatter per run."""
    rows = [(d, m) for d in directions for m in methods]
    n_runs = len(reports)
    fig = Figure(figsize=(4.5 * (n_runs + 1), 3.4 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), n_runs + 1, squeeze=False)
    for (direction, method), row in zip(rows, axes):
        counts = method_counts(reports, direction, method)
        first = next(iter(counts.values()))
        draw_k_occurrence(row[0], {label: c.n_k for label, c in counts.items()}, first.k, first.hub_factor, True)
        row[0].set_title(f"{direction}, {method}: k-occurrence", fontsize="medium")
        x_max = max(int(c.n_k.max()) for c in counts.values())  # one N_k scale for every run
        for ax, (label, c) in zip(row[1:], counts.items()):
            draw_hub_scatter(ax, c, x_max)
            ax.set_title(f"{label} ({direction}, {method})", fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def table(reports: dict, directions: list[str], methods: list[str]) -> str:
    """Markdown table, one line per run, direction and method, with its most retrieved item."""
    header = ["run", "dir", "method", "k", *(name for name, _, _ in COLUMNS), "top item (N_k, correct)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for direction in directions:
        for method in methods:
            for label in reports:
                report = reports[label][direction]["methods"][method]
                s = report["summary"]
                top = report["hubs"][0] if report["hubs"] else None
                top_text = f"{top.get('id', top['index'])} ({top['n_k']}, {top['correct']})" if top else "-"
                cells = [label, direction, method, str(s["k"]), *(fmt.format(s[key]) for _, key, fmt in COLUMNS)]
                lines.append("| " + " | ".join([*cells, top_text]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    reports = load(args.runs, labels, args.name, args.directions)
    for direction in args.directions:
        for method in args.methods:
            method_counts(reports, direction, method)  # every run has every method, before anything is written
    png = draw(reports, args.directions, args.methods, args.out.with_suffix(".png"))
    text = table(reports, args.directions, args.methods)
    args.out.with_suffix(".md").write_text(f"# Hubs: {' vs '.join(labels)}\n\n![hubs]({png.name})\n\n{text}\n")
    print(text)
    print(f"written: {png}, {args.out.with_suffix('.md')}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
