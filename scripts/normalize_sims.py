"""Hubness normalisation of saved similarity matrices, for users of any retrieval codebase.

    python scripts/normalize_sims.py --test sims/test.npy --query-bank sims/qbank.npy --gallery-bank sims/gbank.npy \\
        --methods none is dis dualis dualdis sn nnn --out results/

Inputs (.npy or .pt, rows are queries of one direction), with the scale each one usually comes on:
  --test                 test queries x test gallery       [Q, G]   cross-modal: logit for CLIP-style models
  --query-bank           query bank x test gallery         [Bq, G]  cross-modal: logit for CLIP-style models
                         (e.g. training captions vs test videos)
  --gallery-bank         gallery bank x test gallery       [Bg, G]  intra-modal (e.g. training vs test videos;
                         DualIS, DualDIS): cosine, since no model head scores video against video
  --query-gallery-bank   query bank x gallery bank         [Bq, Bg] cross-modal (DBSN): logit for CLIP-style models
  --gt                   ground-truth gallery index of each query [Q], whole numbers in [0, G)
                         (.npy or .pt; default: query i matches item i)
  --gallery-owner        instead of --gt, for queries with several correct items (video-to-text with several
                         captions per video): the query each gallery item belongs to [G], whole numbers in [0, Q),
                         every query owning at least one; ranked by --v2t-protocol: best_caption (default, the
                         CLIP4Clip / official protocol: a query against each query's best item) or all_captions
Each matrix declares its own scale: --test-scale, --query-bank-scale, --gallery-bank-scale and
--query-gallery-bank-scale (cosine or logit), each defaulting to --scale (cosine). Logits lambda*cos (CLIP: x100)
are divided by --logit-scale lambda, so that beta and tau mean the same on every input. So CLIP sims with a
cosine gallery bank are: --scale logit --logit-scale 100 --gallery-bank-scale cosine.

Prints a table (R@1/5/10, MdR, MnR, skewness of N_k with zero-occurrence items, hub and anti-hub occurrence) and
writes it as JSON (rows keyed "q2g", query to gallery) with a k-occurrence plot. A bad input stops with a
one-line "error: ..." message and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from neighborretr.eval import hubness as hub
from neighborretr.eval.hubness import BANKS_NEEDED, GATE_MODES, METHODS, normalize, to_cosine_scale
from neighborretr.eval.hubness_metrics import hubness_report, k_occurrence, plot_k_occurrence
from neighborretr.eval.metrics import COLUMNS, V2T_PROTOCOLS, positive_ranks, rank_metrics, v2t_ranks

INPUTS = ("test", "query_bank", "gallery_bank", "query_gallery_bank")
SCALES = ("cosine", "logit")
DIRECTION = "q2g"  # rows are queries of whatever direction the matrices hold, columns gallery items
# Methods whose bank pass takes the top --dis-k of each bank row (bank_stats).
TOP_K_METHODS = ("is", "dis", "dualis", "dualdis")


def fail(message: str) -> NoReturn:
    """Stop with a one-line ``error: ...`` on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _read(path: Path, flag: str) -> np.ndarray | torch.Tensor:
    """The array or tensor stored in a .npy or .pt file."""
    if not path.is_file():
        fail(f"{flag}: no such file {path}")
    if path.suffix not in (".npy", ".pt", ".pth"):
        fail(f"{flag}: {path} must be a .npy or .pt file")
    try:
        if path.suffix == ".npy":
            value = np.load(path)
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        fail(f"{flag}: cannot read {path}: {_first_line(err)}")
    if not isinstance(value, np.ndarray | torch.Tensor):
        fail(f"{flag}: {path} holds a {type(value).__name__}, not an array")
    return value


def load_matrix(path: Path | None, name: str) -> torch.Tensor | None:
    """A non-empty, finite 2-D float matrix from .npy or .pt, or None when no path was given."""
    if path is None:
        return None
    flag = _flag(name)
    value = _read(path, flag)
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            fail(f"{flag}: expected a 2-D float matrix in {path}, got {value.dtype} values")
        value = torch.from_numpy(value)
    if value.ndim != 2 or not value.is_floating_point():
        fail(f"{flag}: expected a 2-D float matrix in {path}, got shape {tuple(value.shape)} of {value.dtype}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        fail(f"{flag}: {path} has shape {tuple(value.shape)}; it needs at least one row and one column")
    if not torch.isfinite(value).all():
        fail(f"{flag}: {path} contains NaN or infinite values")
    return value.float()


def load_gt(path: Path | None, queries: int, gallery: int) -> torch.Tensor:
    """[Q] int64 gallery index of each query: whole numbers in [0, G), one per row of --test."""
    if path is None:
        return torch.arange(queries)
    value = _read(path, "--gt")
    gt = value.numpy() if isinstance(value, torch.Tensor) else value
    if gt.ndim == 0 or gt.ndim > 2 or (gt.ndim == 2 and gt.shape[1] != 1) or gt.size != queries:
        fail(
            f"--gt: {path} has shape {gt.shape}, but --test has {queries} queries (rows); "
            f"it needs one gallery index per query, shape ({queries},)"
        )
    gt = gt.reshape(-1)
    if gt.dtype.kind not in "iuf":
        fail(f"--gt: {path} holds {gt.dtype} values; it needs whole-number gallery indices")
    if gt.dtype.kind == "f":
        bad = ~np.isfinite(gt) | (gt != np.round(gt))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            fail(f"--gt: {path} holds {gt[i]:g} at position {i}; gallery indices must be whole numbers")
    outside = (gt < 0) | (gt >= gallery)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        hint = "; 1-based? subtract 1" if gt.min() == 1 and gt.max() == gallery else ""
        fail(
            f"--gt: {path} holds {gt[i]:g} at position {i}, outside the gallery; "
            f"indices must be in [0, {gallery}) (the columns of --test){hint}"
        )
    return torch.from_numpy(gt.astype(np.int64))


def load_gallery_owner(path: Path, queries: int, gallery: int) -> torch.Tensor:
    """[G] int64 query index each gallery item belongs to: whole numbers in [0, Q), every query owning one."""
    value = _read(path, "--gallery-owner")
    owner = (value.numpy() if isinstance(value, torch.Tensor) else value).reshape(-1)
    if owner.size != gallery:
        fail(
            f"--gallery-owner: {path} has {owner.size} values, but --test has {gallery} gallery items (columns); "
            f"it needs the owning query of each, shape ({gallery},)"
        )
    if owner.dtype.kind not in "iuf" or (owner.dtype.kind == "f" and not np.all(owner == np.round(owner))):
        fail(f"--gallery-owner: {path} must hold whole-number query indices, got {owner.dtype} values")
    if owner.min() < 0 or owner.max() >= queries:
        fail(f"--gallery-owner: {path} holds values outside [0, {queries}) (the rows of --test)")
    orphans = np.setdiff1d(np.arange(queries), owner)
    if orphans.size:
        fail(f"--gallery-owner: {orphans.size} query row(s) own no gallery item (first: {int(orphans[0])})")
    return torch.from_numpy(owner.astype(np.int64))


def query_ranks(scores: torch.Tensor, gt: torch.Tensor | None, owner: torch.Tensor | None, protocol: str):
    """[Q] 0-based rank of each query: of its --gt item, or (with --gallery-owner) by ``protocol``."""
    if owner is None:
        return positive_ranks(scores, torch.nn.functional.one_hot(gt, scores.shape[1]).bool())
    return v2t_ranks(scores.T, owner, protocol=protocol)  # v2t_ranks reads [items, queries] with each item's query


def check_shapes(test, query_bank, gallery_bank, query_gallery_bank) -> None:
    """Every bank must score the same test gallery, and the DBSN bank the same query and gallery banks."""
    gallery = test.shape[1]
    for name, matrix in (("query-bank", query_bank), ("gallery-bank", gallery_bank)):
        if matrix is not None and matrix.shape[1] != gallery:
            fail(
                f"--{name} has {matrix.shape[1]} columns but --test has {gallery} gallery items; "
                "both must score the same test gallery in the same order"
            )
    if query_gallery_bank is None:
        return
    if query_bank is not None and query_gallery_bank.shape[0] != query_bank.shape[0]:
        fail(f"--query-gallery-bank has {query_gallery_bank.shape[0]} rows but --query-bank has {query_bank.shape[0]}")
    if gallery_bank is not None and query_gallery_bank.shape[1] != gallery_bank.shape[0]:
        fail(
            f"--query-gallery-bank has {query_gallery_bank.shape[1]} columns but --gallery-bank has "
            f"{gallery_bank.shape[0]} rows; both must list the gallery bank in the same order"
        )


def check_settings(args: argparse.Namespace) -> None:
    """Refuse temperatures, counts and the logit scale that no method can use (before any file is read)."""
    for flag, value in (("--beta-query-bank", args.beta_query_bank), ("--beta-gallery-bank", args.beta_gallery_bank)):
        if not (math.isfinite(value) and value >= 0):
            fail(f"{flag} must be a finite number >= 0 (an inverse temperature on the cosine scale), got {value:g}")
    if not (math.isfinite(args.tau) and args.tau > 0):
        fail(f"--tau must be a finite number > 0 (a temperature on the cosine scale), got {args.tau:g}")
    if not (math.isfinite(args.nnn_alpha) and args.nnn_alpha >= 0):
        fail(f"--nnn-alpha must be a finite number >= 0, got {args.nnn_alpha:g}")
    counts = (("--sinkhorn-iters", args.sinkhorn_iters), ("--dis-k", args.dis_k), ("--k", args.k))
    for flag, value in (*counts, ("--nnn-k", args.nnn_k)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if args.gt is not None and args.gallery_owner is not None:
        fail("--gt and --gallery-owner both say which items are correct; pass one")
    if args.logit_scale is not None and not (math.isfinite(args.logit_scale) and args.logit_scale > 0):
        fail(f"--logit-scale must be the positive multiplier lambda (CLIP: 100), got {args.logit_scale:g}")
    logit = [_flag(n) for n in INPUTS if getattr(args, n) is not None and getattr(args, f"{n}_scale") == "logit"]
    if logit and args.logit_scale is None:
        fail(f"inputs on the logit scale ({', '.join(logit)}) need --logit-scale, the multiplier lambda (CLIP: 100)")


def to_cosine(matrix: torch.Tensor, name: str, scale: str, logit_scale: float | None) -> torch.Tensor:
    """``matrix`` on the cosine scale, refusing a declared scale that the values contradict."""
    flag, tolerance = _flag(name), 1 + hub.COSINE_TOLERANCE
    peak = float(matrix.abs().max())
    if scale == "logit":
        if logit_scale > tolerance and peak <= tolerance:
            fail(
                f"{flag} is declared on the logit scale but max|s| = {peak:.4g} <= 1 looks like cosines, "
                f"which --logit-scale {logit_scale:g} would shrink to nothing; pass {flag}-scale cosine"
            )
        if peak / logit_scale > tolerance:
            fail(
                f"{flag} has max|s| = {peak:.4g}, still {peak / logit_scale:.4g} > 1 after dividing by "
                f"--logit-scale {logit_scale:g}; check --logit-scale (CLIP: 100)"
            )
        return to_cosine_scale(matrix, "logit", logit_scale)
    if peak > tolerance:
        fail(
            f"{flag} has max|s| = {peak:.4g} > 1, so it is not on the cosine scale; if it holds logits, pass "
            f"{flag}-scale logit (or --scale logit for every input) with --logit-scale (CLIP: 100)"
        )
    return matrix


def format_table(rows: dict[str, dict[str, dict[str, float]]], k: int, title: str) -> str:
    """Aligned plain-text table, one line per method, of the query-to-gallery metrics in ``rows``."""
    columns = [(c, c, "{:.1f}") for c in COLUMNS] + [
        (f"Skew@{k}", "skewness", "{:.2f}"),
        ("HubOcc", "hub_occurrence", "{:.3f}"),
        ("AntiHub", "antihub_occurrence", "{:.3f}"),
    ]
    header = ["method"] + [name for name, _, _ in columns]
    body = [[method] + [fmt.format(r[DIRECTION][key]) for _, key, fmt in columns] for method, r in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title]
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("test", "query-bank", "gallery-bank", "query-gallery-bank", "gt", "gallery-owner"):
        p.add_argument(f"--{name}", type=Path, required=name == "test")
    p.add_argument("--v2t-protocol", choices=V2T_PROTOCOLS, default="best_caption", help="ranking with --gallery-owner")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: every method whose banks are given")
    p.add_argument("--scale", choices=SCALES, default="cosine", help="scale of every input without its own")
    for name in INPUTS:
        p.add_argument(f"{_flag(name)}-scale", choices=SCALES, default=None, help="default: --scale")
    p.add_argument("--logit-scale", type=float, default=None, help="λ of logit-scale scores (CLIP: 100)")
    p.add_argument("--beta-query-bank", type=float, default=hub.DEFAULT_BETA_QUERY_BANK, help="cosine scale, >= 0")
    p.add_argument("--beta-gallery-bank", type=float, default=hub.DEFAULT_BETA_GALLERY_BANK, help="cosine scale, >= 0")
    p.add_argument("--tau", type=float, default=hub.DEFAULT_TAU, help="Sinkhorn temperature (SN, DBSN), > 0")
    p.add_argument("--sinkhorn-iters", type=int, default=hub.DEFAULT_SINKHORN_ITERS)
    p.add_argument("--dis-k", type=int, default=1, help="top-k of each bank row forming the activation set")
    p.add_argument("--nnn-alpha", type=float, default=hub.DEFAULT_NNN_ALPHA, help="NNN bias weight, >= 0")
    p.add_argument("--nnn-k", type=int, default=hub.DEFAULT_NNN_K, help="NNN: reference queries per item, <= Bq")
    p.add_argument(
        "--gate-mode", choices=GATE_MODES, default="per_factor", help="DualDIS gating (legacy: official code)"
    )
    p.add_argument("--k", type=int, default=10, help="k of the k-occurrence hubness figures, <= gallery size")
    p.add_argument("--out", type=Path, default=Path("normalized"))
    args = p.parse_args(argv)
    for name in INPUTS:  # resolved here, so the saved settings say the scale each input was read on
        if getattr(args, f"{name}_scale") is None:
            setattr(args, f"{name}_scale", args.scale)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_settings(args)
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out: {args.out} exists and is not a folder")
    mats = {n: load_matrix(getattr(args, n), n) for n in INPUTS}
    check_shapes(*(mats[n] for n in INPUTS))
    queries, gallery = mats["test"].shape
    mats = {
        n: None if m is None else to_cosine(m, n, getattr(args, f"{n}_scale"), args.logit_scale)
        for n, m in mats.items()
    }
    if args.methods is None:
        args.methods = [m for m in METHODS if all(mats[b] is not None for b in BANKS_NEEDED[m])]
    for method in args.methods:
        missing = [b for b in BANKS_NEEDED[method] if mats[b] is None]
        if missing:
            fail(f"method {method!r} needs {', '.join(_flag(b) for b in missing)}")
    if args.k > gallery:
        fail(f"--k {args.k} is larger than the gallery ({gallery} columns of --test); use --k <= {gallery}")
    if args.dis_k > gallery and any(m in TOP_K_METHODS for m in args.methods):
        fail(f"--dis-k {args.dis_k} is larger than the gallery ({gallery} columns of --test); use --dis-k <= {gallery}")
    if "nnn" in args.methods and args.nnn_k > mats["query_bank"].shape[0]:
        bank = mats["query_bank"].shape[0]
        fail(f"--nnn-k {args.nnn_k} is larger than the query bank ({bank} rows of --query-bank); use --nnn-k <= {bank}")
    owner = None if args.gallery_owner is None else load_gallery_owner(args.gallery_owner, queries, gallery)
    gt = load_gt(args.gt, queries, gallery) if owner is None else None

    rows, counts = {}, {}
    try:
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
                nnn_alpha=args.nnn_alpha,
                nnn_k=args.nnn_k,
            )
            ranks = rank_metrics(query_ranks(scores, gt, owner, args.v2t_protocol))
            rows[method] = {DIRECTION: ranks | hubness_report(scores, k=args.k)}
            counts[method] = k_occurrence(scores, k=args.k)
    except ValueError as err:  # the checks above should leave nothing for the library to refuse
        fail(f"{method}: {_first_line(err)}")
    print(format_table(rows, args.k, title=f"{queries} queries x {gallery} gallery items"))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--out: cannot create {args.out}: {_first_line(err)}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "metrics.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    plot_k_occurrence(counts, args.out / "k_occurrence.png", k=args.k)
    print(f"results: {args.out / 'metrics.json'}, plot: {args.out / 'k_occurrence.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
