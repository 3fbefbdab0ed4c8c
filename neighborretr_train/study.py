"""The loss study: InfoNCE against NeighborRetr, its ablations and its clean switches, several seeds each, on one
or more data sets, every run scored raw and with post-hoc hubness normalisations; writes the mean +- std tables
and the paired comparison against InfoNCE.

    neighborretr-study                                                  # both synthetic sets, 3 seeds, CPU sizes
    neighborretr-study --data msrvtt --common experiment=msrvtt_vitb32 data.root=/data/msrvtt --seeds 0 1 2

Each run is the training recipe's in-process `train(cfg)` with the overrides of its variant (VARIANTS), `seed=<s>`
and `data=<set>`; the built-in sets also get their epochs (CPU_EPOCHS: plain 2, hub-prone 5) unless --common sets
trainer.epochs; a run whose results.json exists is read, not retrained, so an interrupted study continues
where it stopped. Runs land in `<output-root>/study_<set>_<variant>_s<seed>/<timestamp>/`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_dir
from scipy import stats

from neighborretr.data.synthetic import generate_synthetic_msrvtt
from neighborretr.data.synthetic_hubs import generate_hub_prone_msrvtt
from neighborretr_train import config_dir
from neighborretr_train.train import train

# Every NeighborRetr variant starts from loss=neighborretr (the official defaults, PARITY.md).
NEIGHBORRETR = ["loss=neighborretr"]
VARIANTS: dict[str, list[str]] = {
    "infonce": ["loss=infonce"],
    "neighborretr": NEIGHBORRETR,
    "no_centrality": [*NEIGHBORRETR, "loss.centrality_scale=0"],
    "no_neighbor": [*NEIGHBORRETR, "loss.neighbor_weight=0"],
    "no_uniform": [*NEIGHBORRETR, "loss.uniform_weight=0"],
    "no_kl": [*NEIGHBORRETR, "loss.kl_weight=0"],
    # every clean switch of PARITY.md's loss table that has a clean value (L_Opt's logit scale has none)
    "clean": [
        *NEIGHBORRETR,
        "loss.kl_reduction=batchmean",
        "loss.centrality_mask_padding=true",
        "loss.detach_centrality=true",
        "loss.centrality_from_bank=true",
        "loss.minmax_over=neighbors",
        "loss.detach_positive_weights=true",
    ],
}
BASELINE = "infonce"
# The CPU budget: the tiny model at 32 px and 4 frames; post-hoc methods with smaller banks. Epochs per built-in set:
# the plain set learns in 2; the hub-prone set's 1,000-clip gallery reached its hubness target in a model that learns
# only with 5. They come before --common, so a trainer.epochs there wins.
CPU_EPOCHS = {"synthetic": 2, "synthetic_hubs": 5}
CPU_COMMON = [
    "experiment=synthetic_tiny",
    "model.image_size=32",
    "data.image_size=32",
    "data.max_frames=4",
    "data.check_videos=false",
    "logger=none",
    "eval.query_bank_size=2000",
    "eval.gallery_bank_size=500",
]
GENERATORS = {"synthetic": generate_synthetic_msrvtt, "synthetic_hubs": generate_hub_prone_msrvtt}
METHODS = ["none", "is", "dualis", "dbsn", "nnn"]
COLUMNS = [("R@1", "R@1"), ("R@5", "R@5"), ("MnR", "MnR"), ("skew", "skewness"), ("hubs", "hub_occurrence")]
COLUMNS += [("anti", "antihub_occurrence")]


def run_name(data: str, variant: str, seed: int) -> str:
    return f"study_{data}_{variant}_s{seed}"


def finished(output_root: Path, name: str) -> Path | None:
    """The newest results.json of run `name`, if one finished."""
    done = sorted((output_root / name).glob("*/results.json"))
    return done[-1] if done else None


def run_overrides(output_root: Path, data: str, variant: str, seed: int, common: list[str]) -> list[str]:
    """The recipe's overrides for one run of the study."""
    epochs = [f"trainer.epochs={CPU_EPOCHS[data]}"] if data in CPU_EPOCHS else []
    overrides = [*epochs, *common, f"data={data}", *VARIANTS[variant], f"seed={seed}"]
    return [*overrides, f"run_name={run_name(data, variant, seed)}", f"output_root={output_root}"]


def run_one(output_root: Path, data: str, variant: str, seed: int, common: list[str]) -> dict:
    """Trains one run in this process (or reads its finished results); returns results.json's content."""
    done = finished(output_root, run_name(data, variant, seed))
    if done is None:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", run_overrides(output_root, data, variant, seed, common))
        # The built-in sets are made on first use at their default size. A folder that holds a generated set is used
        # as it is: it may have been made with other sizes (e.g. --num-test 200), which regenerating would undo.
        if data in GENERATORS and not (Path(cfg.data.root) / "synthetic_meta.json").is_file():
            GENERATORS[data](cfg.data.root, progress=False)
        try:
            train(cfg)
        finally:  # Accelerate keeps process-wide state; the next run builds its own
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        done = finished(output_root, run_name(data, variant, seed))
    return json.loads(done.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired(diffs: list[float]) -> dict:
    """Per-seed differences (variant - InfoNCE): mean, std, two-sided paired t-test p (NaN below 2 seeds or with
    identical differences), and how many seeds went each way."""
    mean, std = mean_std(diffs)
    p = float("nan")
    if len(diffs) > 1 and std > 0:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return {"mean": mean, "std": std, "p": p, "up": sum(d > 0 for d in diffs), "down": sum(d < 0 for d in diffs)}


def aggregate(results: dict[tuple[str, str, int], dict], methods: list[str]) -> dict:
    """{data: {variant: {method: {direction: {metric: [per-seed values]}}}}} from the runs' results."""
    table: dict = {}
    for (data, variant, _seed), res in sorted(results.items()):
        rows = res["normalized"]
        for method in methods:
            if method not in rows:
                continue
            for direction, metrics in rows[method].items():
                cell = table.setdefault(data, {}).setdefault(variant, {}).setdefault(method, {})
                for key, value in metrics.items():
                    cell.setdefault(direction, {}).setdefault(key, []).append(value)
    return table


def format_tables(table: dict) -> str:
    """Markdown: one table per data set and direction, mean +- std over seeds, then the paired comparison."""
    lines = []
    for data, variants in table.items():
        for direction in ("t2v", "v2t"):
            lines += [f"### {data}, {direction} (mean ± std over seeds)", ""]
            header = "| variant | method | seeds | " + " | ".join(name for name, _ in COLUMNS) + " |"
            lines += [header, "|" + "---|" * (len(COLUMNS) + 3)]
            for variant, methods in variants.items():
                for method, by_dir in methods.items():
                    metrics = by_dir[direction]
                    cells = []
                    for _name, key in COLUMNS:
                        mean, std = mean_std(metrics[key])
                        digits = 3 if key in ("hub_occurrence", "antihub_occurrence") else 2
                        cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
                    lines.append(f"| {variant} | {method} | {len(metrics['R@1'])} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += _paired_table(data, variants)
    return "\n".join(lines)


def _paired_table(data: str, variants: dict) -> list[str]:
    """Each variant (raw) and each normalisation of it against raw InfoNCE, seed by seed."""
    if BASELINE not in variants or "none" not in variants[BASELINE]:
        return []
    base = variants[BASELINE]["none"]
    lines = [f"### {data}: paired differences against raw InfoNCE (same seeds)", ""]
    lines += ["Δ = variant − InfoNCE per seed; p: two-sided paired t-test over seeds; ↑/↓: seeds up/down; "]
    lines += ["**bold**: p < 0.05 and every seed the same way.", ""]
    keys = [("t2v", "R@1"), ("v2t", "R@1"), ("t2v", "skewness"), ("v2t", "skewness")]
    lines += ["| variant | method | " + " | ".join(f"Δ {d} {k}" for d, k in keys) + " |", "|---|---|" + "---|" * 4]
    for variant, methods in variants.items():
        for method, by_dir in methods.items():
            if variant == BASELINE and method == "none":
                continue
            cells = []
            for direction, key in keys:
                ours, theirs = by_dir[direction][key], base[direction][key]
                n = min(len(ours), len(theirs))
                cell = paired([a - b for a, b in zip(ours[:n], theirs[:n])])
                text = f"{cell['mean']:+.2f} ± {cell['std']:.2f} (p={_p(cell['p'])}, {cell['up']}↑{cell['down']}↓)"
                beyond = cell["p"] < 0.05 and (cell["up"] == n or cell["down"] == n)
                cells.append(f"**{text}**" if beyond else text)
            lines.append(f"| {variant} | {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["synthetic", "synthetic_hubs"], help="data configs")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="evaluation normalisations (eval.normalizations)")
    parser.add_argument(
        "--common", nargs="*", default=CPU_COMMON, help="overrides of every run (default: the CPU budget)"
    )
    parser.add_argument("--output-root", type=Path, default=Path("outputs/study"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/study"), help="folder for the tables")
    parser.add_argument(
        "--tables-only", action="store_true", help="train nothing: tabulate the finished runs (rows say how many seeds)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common = [*args.common, f"eval.normalizations=[{','.join(args.methods)}]"]
    results, minutes = {}, {}
    # seeds outermost, so an interrupted study has every variant at the same number of seeds
    for seed in args.seeds:
        for data in args.data:
            for variant in args.variants:
                tic, name = time.time(), run_name(data, variant, seed)
                if args.tables_only:
                    done = finished(args.output_root, name)
                    if done is not None:
                        results[data, variant, seed] = json.loads(done.read_text())
                    continue
                results[data, variant, seed] = run_one(args.output_root, data, variant, seed, common)
                minutes[name] = round((time.time() - tic) / 60, 2)
                print(f"[study] {name}: {minutes[name]} min", flush=True)
    table = aggregate(results, args.methods)
    text = format_tables(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(text + "\n")
    payload = {"variants": VARIANTS, "table": table}
    if not args.tables_only:  # a tabulation trained nothing: its settings need not be the runs' own
        payload |= {"common": common, "epochs_per_set": CPU_EPOCHS, "minutes": minutes}
    (args.out / "study.json").write_text(json.dumps(payload, indent=1))
    return table


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
