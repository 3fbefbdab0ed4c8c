"""Post-hoc hubness normalisation of retrieval scores: IS, QB-Norm DIS, DBNorm DualIS/DualDIS, SN, DBSN and NNN.

Every method maps the test similarity matrix ``s`` [Q, G] (test queries x test gallery) to log-domain scores
(NNN: shifted cosines) whose per-row order is the method's ranking (``docs/HUBNESS_METHODS.md`` §2 and §3.5).
The work is split in two:

* an offline *bank pass* over a similarity source (bank rows x test-gallery columns) that yields O(G) vectors:
  :func:`bank_stats` (log-sum-exp normaliser ``Z`` and bank k-occurrence), :func:`sinkhorn_potentials` (``h``)
  and :func:`nnn_bias` (Nearest Neighbor Normalization's per-item bias ``b``);
* an online pass, :func:`normalize_scores`, that costs O(G) per query row.

Scale: every ``beta`` (inverse temperature) and ``tau`` (temperature) in this module is defined on the **cosine
scale**, ``s`` in [-1, 1]. CLIP-style logits ``lambda * cos`` (``lambda = exp(logit_scale)``, about 100) must be
divided by ``lambda`` first (:func:`to_cosine_scale`), and a beta tuned on logits converts as
``beta_cosine = beta_logit * lambda`` (QB-Norm's 1/1.99 on CLIP2Video logits is about 50 here). The guard
:func:`check_cosine_scale` rejects inputs with ``max|s| > 1 + 1e-3``, so a wrong scale fails loudly instead of
silently over-correcting.

Similarities are never exponentiated outside a log-sum-exp, inputs are never modified, and bank rows are streamed
in chunks, so memory is O(chunk_size * G) and the full bank matrix is never built. Work runs on the inputs' device
in float32 (float64 inputs stay float64, which the reference tests use).

A *source* of bank similarities is either a tensor [N_bank, N_cols] or a block function
``block(start, stop) -> Tensor [stop - start, N_cols]`` together with its row count ``N_bank``; block functions
let a caller compute bank rows on the fly, e.g. :func:`embedding_blocks` (``bank[start:stop] @ gallery.T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

BlockFn = Callable[[int, int], Tensor]
SimSource = Tensor | BlockFn
# A bank for :func:`normalize`: a tensor, or a block function with its row count.
BankInput = Tensor | tuple[BlockFn, int]

METHODS = ("none", "is", "dis", "dualis", "dualdis", "sn", "dbsn", "nnn")
# The bank matrices each method needs, named as :func:`normalize`'s arguments (t2v: query bank = training
# captions x test videos, gallery bank = training videos x test videos, query-gallery bank = training captions
# x training videos).
BANKS_NEEDED: dict[str, tuple[str, ...]] = {
    "none": (),
    "is": ("query_bank",),
    "dis": ("query_bank",),
    "dualis": ("query_bank", "gallery_bank"),
    "dualdis": ("query_bank", "gallery_bank"),
    "sn": ("query_bank",),
    "dbsn": ("query_bank", "query_gallery_bank"),
    "nnn": ("query_bank",),
}
GATE_MODES = ("per_factor", "legacy", "union", "intersection")
SINKHORN_FIRST_UPDATES = ("bank", "columns")
COSINE_TOLERANCE = 1e-3

# Defaults of :func:`normalize`, all on the cosine scale (justified in its docstring).
DEFAULT_BETA_QUERY_BANK = 20.0
DEFAULT_BETA_GALLERY_BANK = 1.0
DEFAULT_TAU = 0.01
DEFAULT_SINKHORN_ITERS = 10
DEFAULT_NNN_ALPHA = 0.75
DEFAULT_NNN_K = 16

_QUERY_BANK_METHODS = ("is", "dis", "dualis", "dualdis")
_GALLERY_BANK_METHODS = ("dualis", "dualdis")
_SINKHORN_METHODS = ("sn", "dbsn")


# ----------------------------------------------------------------------------------------------------- scale


def to_cosine_scale(sim: Tensor, scale: str, logit_scale: float | None = None) -> Tensor:
    """A copy of ``sim`` on the cosine scale.

    Args:
        sim: [..] similarities, either cosines (``scale="cosine"``) or logits ``lambda * cos`` (``scale="logit"``).
        scale: ``"cosine"`` or ``"logit"``.
        logit_scale: the multiplier ``lambda = exp(model.logit_scale)`` (about 100 for CLIP), not the log-parameter;
            required for ``scale="logit"``.

    Returns:
        A new tensor of ``sim``'s shape: ``sim`` cloned (cosine) or ``sim / logit_scale`` (logit).
    """
    if scale == "cosine":
        return sim.clone()
    if scale != "logit":
        raise ValueError(f"scale must be 'cosine' or 'logit', got {scale!r}")
    if logit_scale is None or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(
            f"scale='logit' needs logit_scale, the positive multiplier lambda = exp(model.logit_scale) "
            f"(about 100 for CLIP), got {logit_scale!r}"
        )
    return sim / logit_scale


def check_cosine_scale(sim: Tensor, name: str = "sim") -> None:
    """Raise ``ValueError`` unless ``sim`` is finite and on the cosine scale (``max|s| <= 1 + 1e-3``).

    Args:
        sim: [..] similarities.
        name: what to call ``sim`` in the error message.
    """
    if sim.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(sim.detach()))  # one pass; NaN propagates into both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or inf; drop padded or masked rows before hubness normalisation")
    peak = max(abs(low), abs(high))
    if peak > 1 + COSINE_TOLERANCE:
        raise ValueError(
            f"{name} has max|s| = {peak:.4g} > 1, but hubness betas and taus are defined on the cosine scale. "
            "If these are logits, declare sim_scale='logit' and the logit scale (lambda = exp(logit_scale), "
            "about 100 for CLIP), or divide by lambda with to_cosine_scale"
        )


# --------------------------------------------------------------------------------------------------- sources


def tensor_blocks(sim: Tensor) -> BlockFn:
    """Block function over the rows of ``sim`` [N, C]: ``block(start, stop) = sim[start:stop]`` (a view)."""
    return lambda start, stop: sim[start:stop]


def embedding_blocks(bank: Tensor, gallery: Tensor) -> BlockFn:
    """Block function of cosine similarities computed on the fly, so the bank matrix is never materialised.

    Args:
        bank: [N_bank, D] L2-normalised bank embeddings.
        gallery: [N_cols, D] L2-normalised embeddings of the columns (test gallery, optionally + gallery bank).

    Returns:
        ``block(start, stop) -> bank[start:stop] @ gallery.T`` of shape [stop - start, N_cols].
    """
    if bank.ndim != 2 or gallery.ndim != 2 or bank.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"need [N_bank, D] and [N_cols, D] embeddings, got {tuple(bank.shape)}, {tuple(gallery.shape)}"
        )
    return lambda start, stop: bank[start:stop] @ gallery.T


def _num_rows(source: SimSource, n_rows: int | None, name: str) -> int:
    """Row count of a source: the tensor's, or the ``n_rows`` a block function comes with."""
    if isinstance(source, Tensor):
        if source.ndim != 2:
            raise ValueError(f"{name} must be a 2-D [rows, columns] matrix, got shape {tuple(source.shape)}")
        if n_rows is not None and n_rows != source.shape[0]:
            raise ValueError(f"{name} has {source.shape[0]} rows but n_rows={n_rows} was given")
        n_rows = source.shape[0]
    elif not callable(source):
        raise TypeError(f"{name} must be a tensor or a block(start, stop) function, got {type(source).__name__}")
    elif n_rows is None:
        raise ValueError(f"{name} is a block function, so its row count must be given")
    if n_rows < 1:
        raise ValueError(f"{name} needs at least one row, got {n_rows}")
    return n_rows


def _chunks(n_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (reference tests); everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _read_block(source: SimSource, start: int, stop: int, n_cols: int | None, name: str) -> Tensor:
    """Rows ``start:stop`` of a source in the work dtype, validated (shape, dtype, cosine scale)."""
    block = source[start:stop] if isinstance(source, Tensor) else source(start, stop)
    if not isinstance(block, Tensor) or block.ndim != 2 or block.shape[0] != stop - start:
        shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
        raise ValueError(f"{name} block {start}:{stop} must be a [{stop - start}, columns] tensor, got {shape}")
    if n_cols is not None and block.shape[1] != n_cols:
        raise ValueError(f"{name} block {start}:{stop} has {block.shape[1]} columns, expected {n_cols}")
    if not block.is_floating_point():
        raise ValueError(f"{name} must hold floating-point similarities, got {block.dtype}")
    check_cosine_scale(block, f"{name} rows {start}:{stop}")
    return block.to(_work_dtype(block))


# ------------------------------------------------------------------------------------------------- bank pass


@dataclass(eq=False)
class BankStats:
    """Column statistics of one bank against the test gallery, all on the cosine scale.

    Attributes:
        lse: [G] float normaliser ``Z(g) = LSE_b beta * s(b, g)`` over the bank rows b.
        occurrence: [G] int64 bank k-occurrence, the number of bank rows with g in their top-k. Items with
            ``occurrence >= 1`` form the activation set ``A`` of DIS / DualDIS.
        beta: the inverse temperature (cosine scale) used for ``lse``.
        k: the top-k used for ``occurrence``.
        n_bank: number of bank rows.
    """

    lse: Tensor
    occurrence: Tensor
    beta: float
    k: int
    n_bank: int

    @property
    def active(self) -> Tensor:
        """[G] bool activation set ``A``: items in at least one bank row's top-k."""
        return self.occurrence >= 1

    @property
    def active_fraction(self) -> float:
        """``|A| / G``; close to 1 means DIS behaves like IS (worth logging, see HUBNESS_METHODS §2.2)."""
        return float(self.active.float().mean())


def bank_stats(source: SimSource, n_bank: int | None, beta: float, k: int = 1, chunk_size: int = 4096) -> BankStats:
    """One streaming pass over a bank: log-sum-exp normaliser and k-occurrence of every gallery column.

    Args:
        source: bank similarities, a tensor [N_bank, G] or a block function (bank rows x test gallery).
        n_bank: number of bank rows (required for a block function; ``None`` takes a tensor's).
        beta: inverse temperature on the cosine scale, >= 0 (0 gives the constant ``log N_bank``).
        k: top-k per bank row for the activation set (QB-Norm's default is 1).
        chunk_size: bank rows per block; extra memory is about 2 * chunk_size * G floats. For wide galleries keep
            blocks at a few million entries (chunk_size ~ 4e6 / G): on CPU, 512-row blocks over a 100k gallery
            were 1.17x faster than 4096-row ones and used 7.6x less memory (2 vCPUs, docs/results/hubness_bank_pass.md).

    Returns:
        :class:`BankStats` with ``lse`` [G] and ``occurrence`` [G] on the source's device.
    """
    n_bank = _num_rows(source, n_bank, "bank")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0 (cosine scale), got {beta}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lse = occurrence = buffer = None
    for start, stop in _chunks(n_bank, chunk_size):
        block = _read_block(source, start, stop, None if lse is None else lse.shape[0], "bank")
        if lse is None:
            if k > block.shape[1]:
                raise ValueError(f"k={k} exceeds the number of gallery columns {block.shape[1]}")
            lse = block.new_full((block.shape[1],), -math.inf)
            occurrence = torch.zeros(block.shape[1], dtype=torch.long, device=block.device)
        # torch.logsumexp(beta * block, dim=0) bit for bit, without its two fresh block-sized temporaries (on CPU
        # each costs page faults; 2.4-2.7x slower than this): beta * block goes into one buffer reused by every
        # block and is shifted and exponentiated in place. beta * max(s) = max(beta * s) exactly (rounding is
        # monotone, beta >= 0).
        if block.is_contiguous():
            if buffer is None or buffer.shape[0] < stop - start:
                buffer = torch.empty_like(block)
            scaled = torch.mul(block, beta, out=buffer[: stop - start])
        else:
            scaled = beta * block  # keeps the block's layout, so the sum below adds in the same order
        shift = beta * block.amax(dim=0)
        lse = torch.logaddexp(lse, scaled.sub_(shift).exp_().sum(dim=0).log_().add_(shift))
        occurrence += torch.bincount(_topk_indices(block, k).flatten(), minlength=block.shape[1])
        del block, scaled  # before the next block is made, so at most one block and the buffer are alive
    return BankStats(lse=lse, occurrence=occurrence, beta=float(beta), k=k, n_bank=n_bank)


def _topk_indices(block: Tensor, k: int) -> Tensor:
    """[c, k] column indices of each row's k largest entries, unsorted (no full sort is needed)."""
    if k == 1:
        # A plain reduction, cheaper than topk on CPU; max's indices (the first maximum, as argmax's) took 0.6-0.7x
        # the time of argmax(dim=1) on CPU (torch 2.14).
        return block.max(dim=1, keepdim=True).indices
    return block.topk(k, dim=1, sorted=False).indices


def sinkhorn_potentials(
    source: SimSource,
    n_bank: int | None,
    n_cols: int | None,
    tau: float,
    iters: int,
    chunk_size: int = 4096,
    first_update: str = "bank",
) -> Tensor:
    """Column potentials ``h`` of entropic OT between bank rows and columns (uniform marginals), streamed.

    Log-domain Sinkhorn on the kernel ``exp(s / tau)``: each iteration is one pass over the bank blocks, with
    ``f_b = tau * (log a - LSE_g (s(b, g) + h_g) / tau)`` exact within a block and
    ``h_g = tau * (log c - LSE_b (s(b, g) + f_b) / tau)`` accumulated across blocks. ``f`` is never stored.
    SN scores are ``s(q, g) + h_g``. For DBSN pass a source whose columns are ``[S_QB | S_QG]`` (query bank x
    [test gallery, gallery bank]) and keep ``h[:G]``.

    Args:
        source: a tensor [N_bank, N_cols] or a block function (bank rows x columns), cosine scale.
        n_bank: number of bank rows (required for a block function; ``None`` takes a tensor's).
        n_cols: number of columns (``None``: taken from the first block).
        tau: temperature on the cosine scale (official SN/DBSN: 0.01).
        iters: number of Sinkhorn iterations T (the official code truncates at 3-10; T is a hyper-parameter).
        chunk_size: bank rows per block; extra memory is O(chunk_size * N_cols).
        first_update: ``"bank"`` starts from ``h = 0`` and updates the bank potentials ``f`` first (HUBNESS_METHODS
            §3.5 and DBSN's official POT call, which has the targets as rows). ``"columns"`` starts from ``f = 0``
            and updates ``h`` first (POT with the bank as rows): then ``iters=1`` is exactly IS with
            ``beta = 1 / tau``. Both converge to the same ``h`` up to a constant; they differ when truncated.

    Returns:
        [N_cols] potentials ``h`` in float32 (float64 for float64 sources) on the source's device.
    """
    n_bank = _num_rows(source, n_bank, "bank")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0 (cosine scale), got {tau}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if first_update not in SINKHORN_FIRST_UPDATES:
        raise ValueError(f"first_update must be one of {SINKHORN_FIRST_UPDATES}, got {first_update!r}")
    h = None
    for iteration in range(iters):
        update_rows = iteration > 0 or first_update == "bank"
        h, n_cols = _sinkhorn_pass(source, n_bank, n_cols, h, tau, update_rows, chunk_size)
    return h


def _sinkhorn_pass(
    source: SimSource, n_bank: int, n_cols: int | None, h: Tensor | None, tau: float, update_rows: bool, chunk: int
) -> tuple[Tensor, int]:
    """One Sinkhorn iteration over all bank blocks; returns the new ``h`` [N_cols] and N_cols."""
    log_a = -math.log(n_bank)
    column_lse = None
    for start, stop in _chunks(n_bank, chunk):
        block = _read_block(source, start, stop, n_cols, "bank")
        n_cols = block.shape[1]
        if h is None:
            h = block.new_zeros(n_cols)
        if update_rows:
            f = tau * (log_a - torch.logsumexp((block + h) / tau, dim=1))
            block = block + f[:, None]
        part = torch.logsumexp(block / tau, dim=0)
        column_lse = part if column_lse is None else torch.logaddexp(column_lse, part)
    return tau * (-math.log(n_cols) - column_lse), n_cols


def nnn_bias(source: SimSource, n_bank: int | None, alpha: float, k: int, chunk_size: int = 4096) -> Tensor:
    """Nearest Neighbor Normalization's per-gallery-item bias (Chowdhury et al., EMNLP 2024), streamed.

    ``b_g = alpha * mean of the k largest s(r, g) over the reference queries r`` (the bank rows). NNN scores are
    ``s(q, g) - b_g``: the bias depends on the bank and the gallery only, so queries can be scored one at a time.

    Args:
        source: reference queries x test gallery, a tensor [N_bank, G] or a block function, cosine scale.
        n_bank: number of bank rows (required for a block function; ``None`` takes a tensor's).
        alpha: bias weight, >= 0 (NNN: about 0.75 with an in-domain bank, 0.25-0.5 otherwise).
        k: reference queries averaged per gallery item, in [1, N_bank].
        chunk_size: bank rows per block; extra memory is O((chunk_size + k) * G).

    Returns:
        [G] bias ``b`` on the source's device, in the work dtype.
    """
    n_bank = _num_rows(source, n_bank, "bank")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"nnn alpha must be finite and >= 0, got {alpha}")
    if not 1 <= k <= n_bank:
        raise ValueError(f"nnn k must be in [1, {n_bank}] (the bank's rows), got {k}")
    top = None  # [<= k, G] the largest values seen so far in each column
    for start, stop in _chunks(n_bank, chunk_size):
        block = _read_block(source, start, stop, None if top is None else top.shape[1], "bank")
        pool = block if top is None else torch.cat([top, block])
        top = pool.topk(min(k, pool.shape[0]), dim=0, sorted=False).values
    return alpha * top.mean(dim=0)


# ----------------------------------------------------------------------------------------------- online pass


@dataclass
class _Terms:
    """Per-column terms of the online pass, already on the scores' device and dtype."""

    beta_q: float = 0.0
    lse_q: Tensor | None = None
    active_q: Tensor | None = None
    beta_g: float = 0.0
    lse_g: Tensor | None = None
    active_g: Tensor | None = None
    potentials: Tensor | None = None
    bias: Tensor | None = None
    gate_mode: str = "per_factor"


def normalize_scores(
    sim: Tensor,
    method: str,
    query_stats: BankStats | None = None,
    gallery_stats: BankStats | None = None,
    potentials: Tensor | None = None,
    gate_mode: str = "per_factor",
    chunk_size: int = 4096,
    bias: Tensor | None = None,
) -> Tensor:
    """Hubness-normalised log-domain scores of the test matrix (online pass, chunked over query rows).

    With ``b_Q = query_stats.beta``, ``Z_q = query_stats.lse``, ``b_G = gallery_stats.beta``,
    ``Z_g = gallery_stats.lse``, ``top1(q) = argmax_g s(q, g)`` and ``A = {occurrence >= 1}``:

    * ``none``: ``s``;  ``is``: ``b_Q s - Z_q``;  ``dis``: ``b_Q s - 1[top1 in A_q] Z_q``;
    * ``dualis``: ``(b_Q + b_G) s - Z_q - Z_g``;
    * ``dualdis``: ``(b_Q + b_G) s - 1[top1 in A_q] Z_q - 1[top1 in A_g] Z_g`` (``gate_mode="per_factor"``: an
      inactive factor keeps its numerator and loses its normaliser). ``"union"`` / ``"intersection"`` apply both
      normalisers when top1 is in ``A_q`` or / and ``A_g``. ``"legacy"`` reproduces the official DBNorm code
      (with its matrix and aliasing bugs fixed): factor ``F = exp(b s - Z)`` when gated, else the raw ``s``, and
      the score is the product ``P = F_Q F_G``. It is returned as ``sign(P) log(1 + |P|)`` computed from
      ``log|s|`` and signs in float64: a strictly increasing map of ``P``, so every ranking (within and across
      rows) equals the code's, while the output stays finite (``P`` itself reaches ``exp(4 beta)``).
    * ``sn`` / ``dbsn``: ``s + h`` with ``h = potentials``.
    * ``nnn``: ``s - b`` with ``b = bias`` (:func:`nnn_bias`), on the cosine scale; every row is corrected by
      the same vector, so a query's scores do not depend on the other queries.

    Scores are ranking-equivalent to the exp-ratio forms per row; rows gated differently are on different
    scales, so compare them across rows (v2t on a transpose, fusion, thresholds) only with care.

    Args:
        sim: [Q, G] test similarities on the cosine scale (test queries x test gallery); not modified.
        method: one of :data:`METHODS`.
        query_stats: :func:`bank_stats` of the query bank x test gallery (is, dis, dualis, dualdis).
        gallery_stats: :func:`bank_stats` of the gallery bank x test gallery (dualis, dualdis).
        potentials: [G] Sinkhorn potentials ``h`` (sn, dbsn).
        gate_mode: DualDIS gating, one of :data:`GATE_MODES`.
        chunk_size: query rows processed at once.
        bias: [G] NNN bias (nnn).

    Returns:
        A new [Q, G] tensor on ``sim``'s device: float32 (float64 for float64 input or ``gate_mode="legacy"``).
    """
    _check_method(method)
    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    if sim.ndim != 2 or not sim.is_floating_point():
        raise ValueError(
            f"sim must be a 2-D floating-point [queries, gallery] matrix, got {sim.dtype} {tuple(sim.shape)}"
        )
    check_cosine_scale(sim, "sim")
    legacy = method == "dualdis" and gate_mode == "legacy"
    dtype = torch.float64 if legacy else _work_dtype(sim)
    terms = _terms(method, sim.shape[1], sim.device, dtype, query_stats, gallery_stats, potentials, gate_mode, bias)
    score = _SCORERS[method]
    out = torch.empty(sim.shape, dtype=dtype, device=sim.device)
    for start, stop in _chunks(sim.shape[0], chunk_size):
        out[start:stop] = score(sim[start:stop].to(dtype), terms)
    return out


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown hubness method {method!r}; choose one of {METHODS}")


def _terms(
    method: str,
    n_gallery: int,
    device: torch.device,
    dtype: torch.dtype,
    query_stats: BankStats | None,
    gallery_stats: BankStats | None,
    potentials: Tensor | None,
    gate_mode: str,
    bias: Tensor | None = None,
) -> _Terms:
    """Validate what ``method`` needs and move it to the scores' device and dtype."""
    terms = _Terms(gate_mode=gate_mode)
    if method in _QUERY_BANK_METHODS:
        terms.beta_q, terms.lse_q, terms.active_q = _stat_terms(
            query_stats, "query_stats", method, n_gallery, device, dtype
        )
    if method in _GALLERY_BANK_METHODS:
        terms.beta_g, terms.lse_g, terms.active_g = _stat_terms(
            gallery_stats, "gallery_stats", method, n_gallery, device, dtype
        )
    if method in _SINKHORN_METHODS:
        if potentials is None:
            raise ValueError(f"method {method!r} needs potentials (sinkhorn_potentials over the query bank)")
        if potentials.shape != (n_gallery,):
            raise ValueError(f"potentials has shape {tuple(potentials.shape)}, expected ({n_gallery},)")
        terms.potentials = potentials.to(device=device, dtype=dtype)
    if method == "nnn":
        if bias is None:
            raise ValueError("method 'nnn' needs bias (nnn_bias over the query bank)")
        if bias.shape != (n_gallery,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_gallery},)")
        terms.bias = bias.to(device=device, dtype=dtype)
    return terms


def _stat_terms(
    stats: BankStats | None, name: str, method: str, n_gallery: int, device: torch.device, dtype: torch.dtype
) -> tuple[float, Tensor, Tensor]:
    """(beta, lse [G], active [G]) of one bank's stats, checked against the gallery size and moved."""
    if stats is None:
        bank = "query" if name == "query_stats" else "gallery"
        raise ValueError(f"method {method!r} needs {name} (bank_stats over the {bank} bank x test gallery)")
    if stats.lse.shape != (n_gallery,) or stats.occurrence.shape != (n_gallery,):
        raise ValueError(
            f"{name} covers {tuple(stats.lse.shape)} gallery columns, but sim has {n_gallery}; "
            "the bank must be scored against the same test gallery"
        )
    return stats.beta, stats.lse.to(device, dtype), stats.active.to(device)


def _gate(s: Tensor, active: Tensor) -> Tensor:
    """[c, 1] bool: is each row's raw top-1 gallery item in the activation set?"""
    return active[s.argmax(dim=1)][:, None]


def _score_none(s: Tensor, t: _Terms) -> Tensor:
    return s


def _score_is(s: Tensor, t: _Terms) -> Tensor:
    return t.beta_q * s - t.lse_q


def _score_dis(s: Tensor, t: _Terms) -> Tensor:
    return t.beta_q * s - torch.where(_gate(s, t.active_q), t.lse_q, 0.0)


def _score_dualis(s: Tensor, t: _Terms) -> Tensor:
    return (t.beta_q + t.beta_g) * s - t.lse_q - t.lse_g


def _score_dualdis(s: Tensor, t: _Terms) -> Tensor:
    gate_q, gate_g = _gate(s, t.active_q), _gate(s, t.active_g)
    if t.gate_mode == "legacy":
        return _legacy_product(s, t, gate_q, gate_g)
    if t.gate_mode == "union":
        gate_q = gate_g = gate_q | gate_g
    elif t.gate_mode == "intersection":
        gate_q = gate_g = gate_q & gate_g
    return (t.beta_q + t.beta_g) * s - torch.where(gate_q, t.lse_q, 0.0) - torch.where(gate_g, t.lse_g, 0.0)


def _legacy_product(s: Tensor, t: _Terms, gate_q: Tensor, gate_g: Tensor) -> Tensor:
    """``sign(P) log(1 + |P|)`` of the official code's ``P = F_Q F_G`` (F = exp-ratio if gated, else raw s).

    ``log|P|`` is a sum of per-factor logs (``b s - Z`` or ``log|s|``), and only raw factors carry a sign, so
    ``P`` is never formed and cannot overflow; ``log(1 + |P|) = logaddexp(log|P|, 0)`` is finite for all s,
    and 0 where ``s == 0`` on a raw factor (``P = 0``).
    """
    log_abs, sign = s.abs().log(), s.sign()
    log_q = torch.where(gate_q, t.beta_q * s - t.lse_q, log_abs)
    log_g = torch.where(gate_g, t.beta_g * s - t.lse_g, log_abs)
    product_sign = torch.where(gate_q, 1.0, sign) * torch.where(gate_g, 1.0, sign)
    return product_sign * torch.logaddexp(log_q + log_g, torch.zeros_like(s))


def _score_sinkhorn(s: Tensor, t: _Terms) -> Tensor:
    return s + t.potentials


def _score_nnn(s: Tensor, t: _Terms) -> Tensor:
    return s - t.bias


_SCORERS: dict[str, Callable[[Tensor, _Terms], Tensor]] = {
    "none": _score_none,
    "is": _score_is,
    "dis": _score_dis,
    "dualis": _score_dualis,
    "dualdis": _score_dualdis,
    "sn": _score_sinkhorn,
    "dbsn": _score_sinkhorn,
    "nnn": _score_nnn,
}


# ------------------------------------------------------------------------------------------------ convenience


def normalize(
    sim_test: Tensor,
    method: str,
    query_bank: BankInput | None = None,
    gallery_bank: BankInput | None = None,
    query_gallery_bank: BankInput | None = None,
    beta_query_bank: float = DEFAULT_BETA_QUERY_BANK,
    beta_gallery_bank: float = DEFAULT_BETA_GALLERY_BANK,
    k: int = 1,
    tau: float = DEFAULT_TAU,
    sinkhorn_iters: int = DEFAULT_SINKHORN_ITERS,
    gate_mode: str = "per_factor",
    chunk_size: int = 4096,
    sim_scale: str = "cosine",
    logit_scale: float | None = None,
    nnn_alpha: float = DEFAULT_NNN_ALPHA,
    nnn_k: int = DEFAULT_NNN_K,
) -> Tensor:
    """Bank pass + online pass for one method (t2v naming; swap the modalities for v2t).

    Defaults, all on the cosine scale (HUBNESS_METHODS §2.8; tune on a validation split with a disjoint bank):

    * ``beta_query_bank = 20``: QB-Norm's IS/DIS default for cosine similarities, the most widely reported
      value. The DBNorm code's 1/1.99 was meant for logits (about 50 here); larger betas over-correct and turn
      items into anti-hubs.
    * ``beta_gallery_bank = 1``: what the DBSN authors used for DualIS (video from stored sims, images); the
      gallery-bank term is a second, weaker density estimate (the DBNorm code uses 3).
    * ``tau = 0.01``, ``sinkhorn_iters = 10``: the official SN/DBSN settings (POT cost ``1 - s``, so cosine
      scale), truncated on purpose.
    * ``nnn_alpha = 0.75``, ``nnn_k = 16``: NNN with an in-domain reference bank (HUBNESS_METHODS §2.8: alpha
      0.75 in-domain, 0.25-0.5 with k 8-16 out of domain).

    Args:
        sim_test: [Q, G] test queries x test gallery.
        method: one of :data:`METHODS`; :data:`BANKS_NEEDED` lists the banks it requires (others are ignored).
        query_bank: [Bq, G] query bank x test gallery (tensor, or ``(block_fn, Bq)``).
        gallery_bank: [Bg, G] gallery bank x test gallery (intra-modal, e.g. video-video).
        query_gallery_bank: [Bq, Bg] query bank x gallery bank (DBSN's extra Sinkhorn columns).
        beta_query_bank: inverse temperature of the query-bank normaliser.
        beta_gallery_bank: inverse temperature of the gallery-bank normaliser (DualIS/DualDIS).
        k: top-k per bank row for the activation sets (DIS, DualDIS).
        tau: Sinkhorn temperature (SN, DBSN).
        sinkhorn_iters: Sinkhorn iterations (SN, DBSN).
        gate_mode: DualDIS gating (see :func:`normalize_scores`).
        chunk_size: rows per block in both passes.
        sim_scale: ``"cosine"`` or ``"logit"``; logits (test and banks) are divided by ``logit_scale``.
        logit_scale: the multiplier ``lambda`` for ``sim_scale="logit"`` (about 100 for CLIP).
        nnn_alpha: NNN's bias weight (nnn).
        nnn_k: reference queries averaged into NNN's bias, at most the query bank's rows (nnn).

    Returns:
        [Q, G] log-domain scores (see :func:`normalize_scores`); no input is modified.
    """
    _check_method(method)
    banks = {"query_bank": query_bank, "gallery_bank": gallery_bank, "query_gallery_bank": query_gallery_bank}
    missing = [name for name in BANKS_NEEDED[method] if banks[name] is None]
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)}")
    if sim_scale != "cosine":
        sim_test = to_cosine_scale(sim_test, sim_scale, logit_scale)  # also validates sim_scale and logit_scale
    sources = {
        name: _bank_source(bank, name, sim_scale, logit_scale) for name, bank in banks.items() if bank is not None
    }
    query_stats = gallery_stats = potentials = bias = None
    if method in _QUERY_BANK_METHODS:
        query_stats = bank_stats(*sources["query_bank"], beta_query_bank, k, chunk_size)
    if method in _GALLERY_BANK_METHODS:
        gallery_stats = bank_stats(*sources["gallery_bank"], beta_gallery_bank, k, chunk_size)
    if method == "sn":
        potentials = sinkhorn_potentials(*sources["query_bank"], sim_test.shape[1], tau, sinkhorn_iters, chunk_size)
    if method == "dbsn":
        source, n_bank = _dbsn_source(sources["query_bank"], sources["query_gallery_bank"], sim_test.shape[1])
        potentials = sinkhorn_potentials(source, n_bank, None, tau, sinkhorn_iters, chunk_size)[: sim_test.shape[1]]
    if method == "nnn":
        bias = nnn_bias(*sources["query_bank"], nnn_alpha, nnn_k, chunk_size)
    return normalize_scores(sim_test, method, query_stats, gallery_stats, potentials, gate_mode, chunk_size, bias)


def _bank_source(bank: BankInput, name: str, sim_scale: str, logit_scale: float | None) -> tuple[SimSource, int]:
    """``(source, n_rows)`` of a bank argument, rescaled block by block for logits (no full-size copy)."""
    if isinstance(bank, Tensor):
        source, n_rows = bank, _num_rows(bank, None, name)
    elif isinstance(bank, tuple) and len(bank) == 2 and callable(bank[0]):
        source, n_rows = bank[0], _num_rows(bank[0], bank[1], name)
    else:
        raise TypeError(f"{name} must be a tensor or a (block_fn, n_rows) tuple, got {type(bank).__name__}")
    if sim_scale == "cosine":
        return source, n_rows
    read = tensor_blocks(source) if isinstance(source, Tensor) else source
    return (lambda start, stop: read(start, stop) / logit_scale), n_rows


def _dbsn_source(
    query_bank: tuple[SimSource, int], query_gallery_bank: tuple[SimSource, int], n_gallery: int
) -> tuple[BlockFn, int]:
    """Block function of ``[S_QB | S_QG]``: query bank x (test gallery, then gallery bank)."""
    (qb, n_qb), (qgb, n_qgb) = query_bank, query_gallery_bank
    if n_qb != n_qgb:
        raise ValueError(f"query_bank has {n_qb} rows but query_gallery_bank has {n_qgb}; both are the query bank")

    def block(start: int, stop: int) -> Tensor:
        # The width check keeps h[:G] aligned with the test gallery.
        test_part = _read_block(qb, start, stop, n_gallery, "query_bank")
        return torch.cat([test_part, _read_block(qgb, start, stop, None, "query_gallery_bank")], dim=1)

    return block, n_qb
