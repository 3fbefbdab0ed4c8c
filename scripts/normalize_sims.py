"""Hubness normalisation of saved similarity matrices, for users of any retrieval codebase.

    python scripts/normalize_sims.py --test sims/test.npy --query-bank sims/qbank.npy --gallery-bank sims/gbank.npy \\
        --methods none is dis dualis dualdis sn --out results/

Inputs (.npy or .pt, rows are queries of one direction):
  --test                 test queries x test gallery       [Q, G]
  --query-bank           query bank x test gallery         [Bq, G]  (e.g. training captions vs test videos)
  --gallery-bank         gallery bank x test gallery       [Bg, G]  (e.g. training vs test videos; DualIS, DualDIS)
  --query-gallery-bank   query bank x gallery bank         [Bq, Bg] (DBSN)
  --gt                   ground-truth gallery index of each query [Q] (default: query i matches item i)
Scores on CLIP's logit scale (x100) need --scale logit --logit-scale 100, so that β and τ mean the same as on
cosine scores. Prints a table (R@1/5/10, MdR, MnR, skewness of N_k with zero-occurrence items, hub and anti-hub
occurrence) and writes it as JSON with a k-occurrence plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from neighborretr.eval import hubness as hub
from neighborretr.eval.hubness import BANKS_NEEDED, GATE_MODES, METHODS, check_cosine_scale, normalize, to_cosine_scale
from neighborretr.eval.hubness_metrics import format_method_table, hubness_report, k_occurrence, plot_k_occurrence
from neighborretr.eval.metrics import positive_ranks, rank_metrics


def load_matrix(path: Path | None, name: str) -> torch.Tensor | None:
    """A 2-D float matrix from .npy or .pt, or None when no path was given."""
    if path is None:
        return None
    if not path.is_file():
        raise SystemExit(f"error: --{name}: no such file {path}")
    if path.suffix == ".npy":
        value = torch.from_numpy(np.load(path))
    elif path.suffix in (".pt", ".pth"):
        value = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise SystemExit(f"error: --{name}: {path} must be a .npy or .pt file")
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        raise SystemExit(f"error: --{name}: expected a 2-D float matrix in {path}")
    if not torch.isfinite(value).all():
        raise SystemExit(f"error: --{name}: {path} contains NaN or infinite values")
    return value.float()


def check_shapes(test, query_bank, gallery_bank, query_gallery_bank) -> None:
    gallery = test.shape[1]
    for name, matrix in (("query-bank", query_bank), ("gallery-bank", gallery_bank)):
        if matrix is not None and matrix.shape[1] != gallery:
            raise SystemExit(
                f"error: --{name} has {matrix.shape[1]} columns but --test has {gallery} gallery items; "
                "both must score the same test gallery in the same order"
            )
    if query_gallery_bank is not None:
        expected = (query_bank.shape[0] if query_bank is not None else None, None)
        if expected[0] is not None and query_gallery_bank.shape[0] != expected[0]:
            raise SystemExit(
                f"error: --query-gallery-bank has {query_gallery_bank.shape[0]} rows but --query-bank has {expected[0]}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("test", "query-bank", "gallery-bank", "query-gallery-bank", "gt"):
        p.add_argument(f"--{name}", type=Path, required=name == "test")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: every method whose banks are given")
    p.add_argument("--scale", choices=["cosine", "logit"], default="cosine")
    p.add_argument("--logit-scale", type=float, default=None, help="λ of logit-scale scores (CLIP: 100)")
    p.add_argument("--beta-query-bank", type=float, default=hub.DEFAULT_BETA_QUERY_BANK, help="cosine scale")
    p.add_argument("--beta-gallery-bank", type=float, default=hub.DEFAULT_BETA_GALLERY_BANK, help="cosine scale")
    p.add_argument("--tau", type=float, default=hub.DEFAULT_TAU, help="Sinkhorn temperature (SN, DBSN)")
    p.add_argument("--sinkhorn-iters", type=int, default=hub.DEFAULT_SINKHORN_ITERS)
    p.add_argument("--dis-k", type=int, default=1, help="top-k of each bank row forming the activation set")
    p.add_argument(
        "--gate-mode", choices=GATE_MODES, default="per_factor", help="DualDIS gating (legacy: official code)"
    )
    p.add_argument("--k", type=int, default=10, help="k of the k-occurrence hubness figures")
    p.add_argument("--out", type=Path, default=Path("normalized"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    names = ("test", "query_bank", "gallery_bank", "query_gallery_bank")
    mats = {n: load_matrix(getattr(args, n), n.replace("_", "-")) for n in names}
    check_shapes(*(mats[n] for n in names))
    try:
        if args.scale == "logit" and args.logit_scale is None:
            raise ValueError("--scale logit needs --logit-scale (CLIP: 100)")
        mats = {n: None if m is None else to_cosine_scale(m, args.scale, args.logit_scale) for n, m in mats.items()}
        for n, m in mats.items():
            if m is not None:
                check_cosine_scale(m, n)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if args.methods is None:
        args.methods = [m for m in METHODS if all(mats[b] is not None for b in BANKS_NEEDED[m])]
    for method in args.methods:
        missing = [b for b in BANKS_NEEDED[method] if mats[b] is None]
        if missing:
            flags = ", ".join("--" + b.replace("_", "-") for b in missing)
            raise SystemExit(f"error: method {method!r} needs {flags}")
    queries, gallery = mats["test"].shape
    gt = torch.arange(queries) if args.gt is None else torch.as_tensor(np.load(args.gt)).long().view(-1)
    if gt.numel() != queries or gt.min() < 0 or gt.max() >= gallery:
        raise SystemExit(f"error: --gt must hold {queries} gallery indices in [0, {gallery})")

    rows, counts = {}, {}
    for method in args.methods:
        scores = normalize(
            mats["test"],
            method,
            query_bank=mats["query_bank"],
            gallery_bank=mats["gallery_bank"],
            query_gallery_bank=mats["query_gallery_bank"],
            beta_query_bank=args.beta_query_bank,
            beta_gallery_bank=args.beta_gallery_bank,
            k=args.dis_k,
            tau=args.tau,
            sinkhorn_iters=args.sinkhorn_iters,
            gate_mode=args.gate_mode,
        )
        positives = torch.nn.functional.one_hot(gt, gallery).bool()
        ranks = rank_metrics(positive_ranks(scores, positives))
        rows[method] = {"q2g": ranks | hubness_report(scores, k=args.k)}
        counts[method] = k_occurrence(scores, k=args.k)
    print(format_method_table(rows, title=f"{queries} queries x {gallery} gallery items"))
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "metrics.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    plot_k_occurrence(counts, args.out / "k_occurrence.png", k=args.k)
    print(f"results: {args.out / 'metrics.json'}, plot: {args.out / 'k_occurrence.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
