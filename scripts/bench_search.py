"""Search benchmark on random features: index size, per-stage query latency and two-stage recall.

    python scripts/bench_search.py                                     # 10k and 100k videos, 2 threads
    python scripts/bench_search.py --sizes 2000 --queries 5 --dim 64 --ann-threshold 1000 --no-write   # smoke

For each gallery size G a search index is written with the library's own format (`neighborretr.search`), with
random but structured features: G/50 topics, each video a noisy copy of its topic, each of its 12 frame tokens a
noisy copy of the video (so near neighbours exist and the ranking is not noise-only); queries are 12 valid text
tokens (of `--words` positions) drawn around a random video. The similarity head is a real, randomly initialised
`TokenSimilarity` of width `--dim`. Bank statistics are random (the normalisation stage's cost does not depend on
their values). Text encoding is not part of this benchmark (the query tokens are given).

Reported per G and first-stage depth: recall@k of the two-stage top-k against exhaustive token-wise scoring of the
whole gallery (how many of the exhaustive top-k the two-stage top-k keeps, averaged over queries), and p50/p95
latency of the first stage, the re-ranking, the DualDIS normalisation and their total. Also the index size on disk
and in memory per video, the load time and the HNSW build time (above `--ann-threshold` the first stage is faiss
HNSW, below it an exact product; `--exact-too` also measures the exact first stage above the threshold).

Writes one JSON line per (G, first stage, depth) to benchmarks/search.jsonl and a markdown table to
docs/results/search.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neighborretr.models.similarity import TokenSimilarity
from neighborretr.search import Sampling, Searcher, load_index
from neighborretr.search.encode import Encoded, summarize
from neighborretr.search.format import Manifest, write_index
from neighborretr.search.scoring import token_scores

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="gallery sizes (videos)")
    p.add_argument("--tokens", type=int, default=12, help="frame tokens per video")
    p.add_argument("--words", type=int, default=32, help="text positions per query (12 of them valid)")
    p.add_argument("--dim", type=int, default=512, help="feature width (ViT-B/32: 512)")
    p.add_argument("--queries", type=int, default=100, help="queries timed and scored for recall per size")
    p.add_argument("--depths", type=int, nargs="+", default=[50, 100, 200, 400, 800], help="first-stage depths")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ann-threshold", type=int, default=20_000, help="exact first stage up to this many videos")
    p.add_argument("--ef-search", type=int, default=256, help="HNSW search beam")
    p.add_argument("--exact-too", action="store_true", help="also time the exact first stage above the threshold")
    p.add_argument("--token-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    p.add_argument("--jsonl", type=Path, default=ROOT / "benchmarks" / "search.jsonl")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results" / "search.md")
    return p.parse_args(argv)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


@torch.no_grad()
def make_items(head: TokenSimilarity, size: int, args, gen: torch.Generator) -> tuple[Encoded, torch.Tensor]:
    """Random structured videos, encoded as the index stores them; and each video's centre [G, D]."""
    topics = unit(torch.randn(max(1, size // 50), args.dim, generator=gen))
    parts, centres = [], []
    for start in tqdm(range(0, size, 5000), desc=f"features for {size} videos", leave=False):
        n = min(5000, size - start)
        topic = topics[torch.randint(len(topics), (n,), generator=gen)]
        centre = unit(topic + unit(torch.randn(n, args.dim, generator=gen)))
        frames = unit(centre[:, None] + 0.7 * unit(torch.randn(n, args.tokens, args.dim, generator=gen)))
        mask = torch.ones(n, args.tokens, dtype=torch.long)
        encoded = summarize(frames, mask, head.video_weights)
        encoded.tokens = encoded.tokens.to(getattr(torch, args.token_dtype))
        parts.append(encoded)
        centres.append(centre)
    cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "mask", "weights", "pooled")]
    return Encoded(*cat), torch.cat(centres)


@torch.no_grad()
def make_queries(head: TokenSimilarity, centres: torch.Tensor, args, gen: torch.Generator) -> Encoded:
    """Queries [Q, words, D] with 12 valid tokens around random videos' centres."""
    targets = centres[torch.randint(len(centres), (args.queries,), generator=gen)]
    valid = min(12, args.words)
    tokens = torch.zeros(args.queries, args.words, args.dim)
    tokens[:, :valid] = unit(targets[:, None] + 0.9 * unit(torch.randn(args.queries, valid, args.dim, generator=gen)))
    mask = torch.zeros(args.queries, args.words, dtype=torch.long)
    mask[:, :valid] = 1
    return summarize(tokens, mask, head.text_weights)


def write_synthetic_index(folder: Path, items: Encoded, args, gen: torch.Generator) -> None:
    """The index files for these features, with random DualDIS statistics (beta 20 / 1, k = 1)."""
    size = items.tokens.shape[0]
    manifest = Manifest("bench", Sampling(args.tokens, 224, args.words), str(folder), args.token_dtype)
    manifest.items = [{"path": f"v{i:07d}.mp4", "duration": 10.0} for i in range(size)]
    manifest.banks = {
        "query_size": 1000,
        "gallery_size": 1000,
        "k": 1,
        "methods": {"dualdis": {"beta_query_bank": 20.0, "beta_gallery_bank": 1.0}},
    }
    stats = {
        "query@20.0.lse": 5 + torch.rand(size, generator=gen),
        "gallery@1.0.lse": 5 + torch.rand(size, generator=gen),
        "query.top_scores": torch.rand(1000, 1, generator=gen),
        "query.top_items": torch.randint(size, (1000, 1), generator=gen),
        "gallery.top_scores": torch.rand(1000, 1, generator=gen),
        "gallery.top_items": torch.randint(size, (1000, 1), generator=gen),
    }
    features = {"tokens": items.tokens, "mask": items.mask, "weights": items.weights, "pooled": items.pooled}
    write_index(folder, manifest, features, {}, stats)


@torch.no_grad()
def exhaustive_top(queries: Encoded, items: Encoded, k: int) -> list[set[int]]:
    """Each query's top-k over the whole gallery by the token-wise score (the reference of the recall)."""
    tops = []
    for q in tqdm(range(queries.tokens.shape[0]), desc="exhaustive scoring", leave=False):
        one = Encoded(*(getattr(queries, f)[q : q + 1] for f in ("tokens", "mask", "weights", "pooled")))
        tops.append(set(token_scores(one, items, chunk_size=2048)[0].topk(k).indices.tolist()))
    return tops


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(searcher: Searcher, queries: Encoded, reference: list[set[int]], depth: int, k: int) -> dict:
    """Recall@k and per-stage latency (ms) of every query at one depth (after one warm-up query)."""
    one = lambda q: Encoded(*(getattr(queries, f)[q : q + 1] for f in ("tokens", "mask", "weights", "pooled")))  # noqa: E731
    searcher.search_encoded(one(0), k, "dualdis", depth)
    stages: dict[str, list[float]] = {}
    recalls = []
    for q in range(queries.tokens.shape[0]):
        result = searcher.search_encoded(one(q), k, "none", depth)
        recalls.append(len({h.item for h in result.hits} & reference[q]) / k)
        timed = searcher.search_encoded(one(q), k, "dualdis", depth)
        for stage, ms in timed.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
    out = {"depth": depth, "candidates": timed.candidates, f"recall@{k}": statistics.mean(recalls)}
    out["min_recall"] = min(recalls)
    for stage, values in stages.items():
        out[f"{stage}_p50_ms"] = percentile(values, 50)
        out[f"{stage}_p95_ms"] = percentile(values, 95)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_size(size: int, args, head: TokenSimilarity, gen: torch.Generator, work: Path) -> list[dict]:
    items, centres = make_items(head, size, args, gen)
    queries = make_queries(head, centres, args, gen)
    folder = work / f"index_{size}"
    write_synthetic_index(folder, items, args, gen)
    del items
    start = time.perf_counter()
    index = load_index(folder)
    load_s = time.perf_counter() - start
    memory = sum(getattr(index.items, f).nbytes for f in ("tokens", "mask", "weights", "pooled"))
    reference = exhaustive_top(queries, index.items, args.top_k)
    rows = []
    thresholds = [args.ann_threshold] + ([size] if args.exact_too and size > args.ann_threshold else [])
    for threshold in thresholds:
        start = time.perf_counter()
        searcher = Searcher(index, depth=args.depths[0], ann_threshold=threshold, ef_search=args.ef_search)
        build_s = time.perf_counter() - start
        disk = folder_bytes(folder)  # includes the HNSW graph once it has been built
        for depth in args.depths:
            row = measure(searcher, queries, reference, min(depth, size), args.top_k)
            row |= {
                "gallery": size,
                "first_stage": searcher.stage.kind,
                "ef_search": args.ef_search if searcher.stage.kind == "hnsw" else None,
                "first_stage_build_s": build_s,
                "load_s": load_s,
                "disk_bytes_per_video": disk / size,
                "memory_bytes_per_video": memory / size,
            }
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    shutil.rmtree(folder)
    return rows


def markdown(rows: list[dict], args, info: dict, command: str) -> str:
    k = args.top_k
    lines = [
        "# Search benchmark (random features)",
        "",
        f"`{command}`",
        "",
        f"Machine: {info['processor']}, {info['cpus']} CPUs, {info['platform']}; torch {info['torch']}, "
        f"{args.threads} threads; {datetime.now(timezone.utc):%Y-%m-%d}. {args.tokens} frame tokens per video, "
        f"d = {args.dim}, {args.token_dtype} tokens, {args.queries} queries (12 valid of {args.words} text tokens). "
        "Latency excludes text encoding; normalisation is DualDIS.",
        "",
        f"| videos | first stage | depth | recall@{k} | min | first stage p50/p95 ms | re-rank p50/p95 ms | "
        "normalise p50 ms | total p50/p95 ms | disk KB/video | memory KB/video | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gallery']:,} | {r['first_stage']} | {r['depth']} | {r[f'recall@{k}']:.3f} | {r['min_recall']:.1f} "
            f"| {r['first_stage_p50_ms']:.1f} / {r['first_stage_p95_ms']:.1f} "
            f"| {r['rerank_p50_ms']:.1f} / {r['rerank_p95_ms']:.1f} | {r['normalize_p50_ms']:.2f} "
            f"| {r['total_p50_ms']:.1f} / {r['total_p95_ms']:.1f} | {r['disk_bytes_per_video'] / 1024:.1f} "
            f"| {r['memory_bytes_per_video'] / 1024:.1f} | {r['first_stage_build_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    head = TokenSimilarity(args.dim).eval()
    info = machine()
    command = "python scripts/bench_search.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_search_") as work:
        for size in args.sizes:
            rows += run_size(size, args, head, gen, Path(work))
    for r in rows:
        r |= {"settings": {k: str(v) for k, v in vars(args).items()}, "machine": info, "command": command}
        r["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table = markdown(rows, args, info, command)
    print(table)
    if not args.no_write:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with args.jsonl.open("a") as handle:
            for r in rows:
                handle.write(json.dumps(r) + "\n")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return rows


if __name__ == "__main__":
    main()
