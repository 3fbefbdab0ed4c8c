"""`neighborretr-search`: index a folder of videos with a trained model, query it by text, serve a search page.

    neighborretr-search index --ckpt outputs/synthetic_tiny/<date_time> --videos data/synthetic/videos \
        --out outputs/search/synthetic --query-bank train --gallery-bank train
    neighborretr-search query --index outputs/search/synthetic "a red circle moves to the left" --top-k 5
    neighborretr-search serve --index outputs/search/synthetic          # http://127.0.0.1:7860

The model comes from a run folder (config.yaml + best/model.pt) or any weights form `neighborretr-eval` takes;
`query` and `serve` use the checkpoint that built the index unless `--ckpt` names another (then it must be the
same model). See docs/search.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from neighborretr.search import (
    DEFAULT_DEPTH,
    Banks,
    Encoded,
    Sampling,
    Searcher,
    SearchIndexError,
    SearchResult,
    TextEncoder,
    build_index,
    encode_captions,
    encode_video_files,
    list_videos,
    load_index,
    model_fingerprint,
)
from neighborretr.search.encode import concat, summarize
from neighborretr.search.first_stage import DEFAULT_ANN_THRESHOLD
from neighborretr.search.format import read_manifest
from neighborretr.search.scoring import SEARCH_METHODS
from neighborretr_train.common import USER_ERRORS, build, log
from neighborretr_train.evaluate import load_run_model, locate


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_identity(run_cfg: DictConfig, weights: Path) -> str:
    return model_fingerprint(OmegaConf.to_container(run_cfg.model, resolve=True), weights)


def sampling_of(run_cfg: DictConfig) -> Sampling:
    """The evaluation decoding settings of a run."""
    d = run_cfg.data
    return Sampling(
        max_frames=int(d.max_frames),
        image_size=int(d.image_size),
        max_words=int(d.max_words),
        sampling=str(d.eval_sampling),
        framerate=None if d.video_framerate is None else float(d.video_framerate),
        backend=str(d.backend),
    )


# ------------------------------------------------------------------------------------------------------- banks


@torch.no_grad()
def _encode_loader(loader, encode, key: str, head: nn.Module, device: torch.device) -> Encoded:
    parts = []
    for batch in tqdm(loader, desc=f"encoding the {'query' if key == 'text' else 'gallery'} bank", unit="batch"):
        mask = batch[f"{key}_mask"].to(device)
        parts.append(summarize(encode(batch[key if key == "video" else "text_ids"].to(device), mask), mask, head))
    return concat([Encoded(p.tokens.cpu(), p.mask.cpu(), p.weights.cpu(), p.pooled.cpu()) for p in parts])


def run_banks(model: nn.Module, run_cfg: DictConfig, device: torch.device, query: bool, gallery: bool) -> Banks:
    """The run's training-split banks, drawn and decoded exactly as its evaluation draws them
    (eval.query_bank_size captions, eval.gallery_bank_size videos, eval.bank_seed)."""
    data = build(run_cfg, "data")
    train = data.records("train")
    e = run_cfg.eval
    text_loader, video_loader = data.bank_loaders(train, e.query_bank_size, e.gallery_bank_size, e.bank_seed)
    banks = Banks()
    if query:
        log.info("encoding the query bank: %d training captions", len(text_loader.dataset))
        banks.query = _encode_loader(text_loader, model.encode_text, "text", model.sim_head.text_weights, device)
        banks.sources["query"] = f"training captions of {data.root} ({len(text_loader.dataset)})"
    if gallery:
        log.info("encoding the gallery bank: %d training videos", len(video_loader.dataset))
        banks.gallery = _encode_loader(
            video_loader, model.encode_video, "video", model.sim_head.video_weights, device
        ).pooled
        banks.sources["gallery"] = f"training videos of {data.root} ({len(video_loader.dataset)})"
    return banks


def file_banks(args, model, sampling: Sampling, device: torch.device, banks: Banks) -> Banks:
    """Banks given as files: a text file of captions (one per line) and/or a folder of videos."""
    if args.query_bank not in (None, "train"):
        path = Path(args.query_bank)
        if not path.is_file():
            raise FileNotFoundError(
                f"--query-bank {path}: not a file; give a text file with one caption a line, or train"
            )
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        banks.query = encode_captions(TextEncoder(model, sampling.max_words, device), captions)
        banks.sources["query"] = f"{path.resolve()} ({len(captions)} captions)"
    if args.gallery_bank not in (None, "train"):
        folder = Path(args.gallery_bank)
        if not folder.is_dir():
            raise FileNotFoundError(f"--gallery-bank {folder}: not a folder of videos; give one, or train")
        paths = list_videos(folder)
        parts = [
            e
            for _, _, e, _ in encode_video_files(model, folder, paths, sampling, device, args.batch_size, args.workers)
            if e
        ]
        if not parts:
            raise FileNotFoundError(f"--gallery-bank {folder}: no decodable video in it")
        banks.gallery = concat(parts).pooled
        banks.sources["gallery"] = f"{folder.resolve()} ({banks.gallery.shape[0]} videos)"
    return banks


def run_betas(run_dir: Path) -> dict | None:
    """The t2v betas a run chose on its validation split (results.json), or None."""
    results = run_dir / "results.json"
    if not results.is_file():
        return None
    params = json.loads(results.read_text()).get("normalization_params", {})
    return {m: p["t2v"] for m, p in params.items() if isinstance(p, dict) and "t2v" in p}


# ----------------------------------------------------------------------------------------------------- commands


def cmd_index(args) -> int:
    device = pick_device(args.device)
    model, run_cfg, weights = load_run_model(Path(args.ckpt))
    model.to(device)
    run_dir, _ = locate(Path(args.ckpt))
    sampling = sampling_of(run_cfg)
    banks = None
    if args.query_bank or args.gallery_bank:
        banks = run_banks(model, run_cfg, device, args.query_bank == "train", args.gallery_bank == "train")
        banks = file_banks(args, model, sampling, device, banks)
    betas = run_betas(run_dir) if args.betas == "run" else None
    if betas is None and (args.beta_query_bank or args.beta_gallery_bank):
        betas = {}
    if args.beta_query_bank or args.beta_gallery_bank:
        given = {
            k: v
            for k, v in (("beta_query_bank", args.beta_query_bank), ("beta_gallery_bank", args.beta_gallery_bank))
            if v
        }
        betas = {m: (betas or {}).get(m, {}) | given for m in SEARCH_METHODS if m != "none"}
    update = build_index(
        Path(args.out),
        model,
        Path(args.videos),
        sampling,
        model_identity(run_cfg, weights),
        device,
        banks=banks,
        betas=betas,
        k=args.k,
        token_dtype=args.token_dtype,
        batch_size=args.batch_size,
        num_workers=args.workers,
        model_info={"weights": str(weights.resolve()), "run_dir": str(run_dir.resolve())},
    )
    print(
        f"{args.out}: {update.added} added, {update.skipped} already indexed, {len(update.failed)} unreadable, "
        f"{update.total} in the index"
    )
    for path, reason in sorted(update.failed.items()):
        print(f"  unreadable: {path}: {reason}")
    return 0


def open_searcher(args) -> Searcher:
    """The index and the model that built it (or `--ckpt`), checked to be the same model."""
    device = pick_device(args.device)
    manifest = read_manifest(Path(args.index))
    ckpt = args.ckpt or manifest.model.get("weights")
    if not ckpt:
        raise SearchIndexError(f"{args.index} does not record its checkpoint; pass --ckpt")
    model, run_cfg, weights = load_run_model(Path(ckpt))
    index = load_index(Path(args.index), model_identity(run_cfg, weights)).to(device)
    encoder = TextEncoder(model.to(device), manifest.sampling.max_words, device)
    return Searcher(index, encoder, depth=args.depth, ann_threshold=args.ann_threshold)


def format_result(result: SearchResult) -> str:
    lines = [f"{'rank':>4}  {'score':>9}  {'raw':>7}  {'sec':>5}  path"]
    for h in result.hits:
        duration = "" if h.duration is None else f"{h.duration:.1f}"
        lines.append(f"{h.rank:>4}  {h.score:>9.4f}  {h.raw_score:>7.4f}  {duration:>5}  {h.path}")
    t = result.timings_ms
    lines.append(
        f"{result.normalization}, {result.candidates} candidates ({result.first_stage}); ms: "
        + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
    )
    return "\n".join(lines)


def cmd_query(args) -> int:
    searcher = open_searcher(args)
    result = searcher.search(args.text, args.top_k, args.normalization)
    print(json.dumps(result.to_json(), indent=1) if args.json else format_result(result))
    return 0


def cmd_serve(args) -> int:
    from neighborretr_train.search_web import serve

    searcher = open_searcher(args)
    serve(searcher, args.host, args.port)
    return 0


# ------------------------------------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neighborretr-search", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="index (or add new files of) a folder of videos")
    index.add_argument("--ckpt", required=True, help="run folder, its best/model.pt or a checkpoints/step_* folder")
    index.add_argument("--videos", required=True, help="folder of videos (searched recursively, any container)")
    index.add_argument("--out", required=True, help="index folder (created; an existing one gets the new files)")
    index.add_argument("--query-bank", help="'train' (the run's training captions) or a text file, one caption a line")
    index.add_argument("--gallery-bank", help="'train' (the run's training videos) or a folder of videos")
    index.add_argument(
        "--betas", choices=("run", "default"), default="run",
        help="run: the betas the run chose on its validation split (results.json); default: the hubness defaults",
    )  # fmt: skip
    index.add_argument("--beta-query-bank", type=float, help="override the query-bank beta of every method")
    index.add_argument("--beta-gallery-bank", type=float, help="override the gallery-bank beta of every method")
    index.add_argument("--k", type=int, default=1, help="bank top-k of the DIS / DualDIS activation sets")
    index.add_argument(
        "--token-dtype", choices=("float16", "float32"), help="stored token precision (new index: float16)"
    )
    index.add_argument("--batch-size", type=int, default=16)
    index.add_argument("--workers", type=int, default=2, help="decoding processes")
    for cmd in (sub.add_parser("query", help="search an index by text"), sub.add_parser("serve", help="web page")):
        cmd.add_argument("--index", required=True, help="index folder")
        cmd.add_argument("--ckpt", help="the model (default: the checkpoint that built the index)")
        cmd.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="first-stage candidates re-ranked")
        cmd.add_argument(
            "--ann-threshold", type=int, default=DEFAULT_ANN_THRESHOLD, help="exact search up to this size"
        )
        if cmd.prog.endswith("query"):
            cmd.add_argument("text", help="what the video shows")
            cmd.add_argument("--top-k", type=int, default=10)
            cmd.add_argument("--normalization", choices=SEARCH_METHODS, default="none")
            cmd.add_argument("--json", action="store_true", help="print the result and the stage timings as JSON")
        else:
            cmd.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
            cmd.add_argument("--port", type=int, default=7860)
    for cmd in sub.choices.values():
        cmd.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except (*USER_ERRORS, SearchIndexError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def cli() -> None:
    """The console script: exit status 0, or 1 with a one-line error."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
