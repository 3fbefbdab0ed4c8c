"""Hubness normalisation (neighborretr.eval.hubness) against a float64 numpy reference of HUBNESS_METHODS §2.

The reference is written from the equations in their exp-ratio form (safe on the cosine scale with beta <= 100),
with explicit copies, and a dense scaling-form Sinkhorn loop; the library works in the log domain, streamed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neighborretr.eval.hubness import (
    BANKS_NEEDED,
    GATE_MODES,
    METHODS,
    BankStats,
    bank_stats,
    check_cosine_scale,
    embedding_blocks,
    nnn_bias,
    normalize,
    normalize_scores,
    sinkhorn_potentials,
    tensor_blocks,
    to_cosine_scale,
)

N_QUERY, N_GALLERY, N_QUERY_BANK, N_GALLERY_BANK, DIM = 40, 30, 50, 35, 16
BETA_Q, BETA_G, TAU, ITERS = 20.0, 3.0, 0.05, 10
NNN_ALPHA, NNN_K = 0.6, 5


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def emb() -> dict[str, np.ndarray]:
    """Random unit embeddings; seed 2 gates rows in all four (query bank, gallery bank) combinations."""
    rng = np.random.default_rng(2)
    return {
        "query": _unit(rng, N_QUERY),
        "gallery": _unit(rng, N_GALLERY),
        "query_bank": _unit(rng, N_QUERY_BANK),
        "gallery_bank": _unit(rng, N_GALLERY_BANK),
    }


@pytest.fixture(scope="module")
def mats(emb) -> dict[str, np.ndarray]:
    """Cosine-scale float64 matrices: test [Q, G], query bank [Bq, G], gallery bank [Bg, G], [Bq, Bg]."""
    return {
        "test": emb["query"] @ emb["gallery"].T,
        "query_bank": emb["query_bank"] @ emb["gallery"].T,
        "gallery_bank": emb["gallery_bank"] @ emb["gallery"].T,
        "query_gallery_bank": emb["query_bank"] @ emb["gallery_bank"].T,
    }


@pytest.fixture(scope="module")
def t(mats) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(m.copy()) for name, m in mats.items()}


# ------------------------------------------------------------------------------------------ numpy reference


def ref_occurrence(bank: np.ndarray, k: int = 1) -> np.ndarray:
    top = np.argsort(-bank, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=bank.shape[1])


def ref_is(s: np.ndarray, bank: np.ndarray, beta: float) -> np.ndarray:
    return np.exp(beta * s) / np.exp(beta * bank).sum(axis=0, keepdims=True)


def ref_gate(s: np.ndarray, bank: np.ndarray, k: int = 1) -> np.ndarray:
    """[Q] bool: is the row's raw top-1 in the bank's activation set?"""
    return (ref_occurrence(bank, k) >= 1)[s.argmax(axis=1)]


def ref_dis(s: np.ndarray, bank: np.ndarray, beta: float) -> np.ndarray:
    out = s.copy()
    rows = ref_gate(s, bank)
    out[rows] = ref_is(s, bank, beta)[rows]
    return out


def ref_dualdis(s: np.ndarray, qb: np.ndarray, gb: np.ndarray, gate_mode: str) -> np.ndarray:
    """Product of the two factors; an inactive factor is exp(beta s) (clean modes) or the raw s (legacy)."""
    gate_q, gate_g = ref_gate(s, qb)[:, None], ref_gate(s, gb)[:, None]
    if gate_mode == "union":
        gate_q = gate_g = gate_q | gate_g
    elif gate_mode == "intersection":
        gate_q = gate_g = gate_q & gate_g
    off_q = s.copy() if gate_mode == "legacy" else np.exp(BETA_Q * s)
    off_g = s.copy() if gate_mode == "legacy" else np.exp(BETA_G * s)
    return np.where(gate_q, ref_is(s, qb, BETA_Q), off_q) * np.where(gate_g, ref_is(s, gb, BETA_G), off_g)


def ref_sinkhorn(bank: np.ndarray, tau: float, iters: int, first_update: str = "bank") -> np.ndarray:
    """Dense scaling-form Sinkhorn, P = diag(u) K diag(v), uniform marginals; returns h = tau log v."""
    kernel = np.exp(bank / tau)
    n, m = bank.shape
    u, v = np.ones(n), np.ones(m)
    for it in range(iters):
        if it > 0 or first_update == "bank":
            u = (1.0 / n) / (kernel @ v)
        v = (1.0 / m) / (kernel.T @ u)
    return tau * np.log(v)


def ref_nnn(s: np.ndarray, bank: np.ndarray, alpha: float, k: int) -> np.ndarray:
    """Plain loops: each gallery item's bias is alpha times the mean of its k best reference-query scores."""
    bias = []
    for g in range(bank.shape[1]):
        column = sorted((float(bank[r, g]) for r in range(bank.shape[0])), reverse=True)
        bias.append(alpha * sum(column[:k]) / k)
    return np.array([[s[q, g] - bias[g] for g in range(s.shape[1])] for q in range(s.shape[0])])


def reference(method: str, m: dict[str, np.ndarray], gate_mode: str = "per_factor") -> np.ndarray:
    s, qb, gb = m["test"], m["query_bank"], m["gallery_bank"]
    if method == "none":
        return s.copy()
    if method == "is":
        return ref_is(s, qb, BETA_Q)
    if method == "dis":
        return ref_dis(s, qb, BETA_Q)
    if method == "dualis":
        return ref_is(s, qb, BETA_Q) * ref_is(s, gb, BETA_G)
    if method == "dualdis":
        return ref_dualdis(s, qb, gb, gate_mode)
    if method == "sn":
        return s + ref_sinkhorn(qb, TAU, ITERS)[None, :]
    if method == "nnn":
        return ref_nnn(s, qb, NNN_ALPHA, NNN_K)
    h = ref_sinkhorn(np.concatenate([qb, m["query_gallery_bank"]], axis=1), TAU, ITERS)
    return s + h[None, : s.shape[1]]


def run(method: str, t: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    params = {"beta_query_bank": BETA_Q, "beta_gallery_bank": BETA_G, "tau": TAU, "sinkhorn_iters": ITERS}
    params |= {"nnn_alpha": NNN_ALPHA, "nnn_k": NNN_K} | kwargs
    banks = {name: t[name] for name in ("query_bank", "gallery_bank", "query_gallery_bank")}
    return normalize(t["test"], method, **banks, **params)


def assert_same_ranking(scores: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> None:
    """Every row sorts the gallery identically (random floats have no exact ties)."""
    a = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    b = np.argsort(-np.asarray(expected), axis=1, kind="stable")
    mismatched = np.flatnonzero((a != b).any(axis=1))
    assert mismatched.size == 0, f"rows with a different ranking: {mismatched.tolist()}"


# ----------------------------------------------------------------------------------------------- reference


def test_fixture_exercises_every_gate_combination(mats):
    gate_q, gate_g = ref_gate(mats["test"], mats["query_bank"]), ref_gate(mats["test"], mats["gallery_bank"])
    combos = {(bool(a), bool(b)) for a, b in zip(gate_q, gate_g)}
    assert combos == {(True, True), (True, False), (False, True), (False, False)}
    assert (mats["test"] < 0).any(), "legacy DualDIS differs from the clean one only with negative similarities"


@pytest.mark.parametrize("method", METHODS)
def test_rankings_match_reference(method, mats, t):
    scores = run(method, t)
    assert scores.shape == (N_QUERY, N_GALLERY) and torch.isfinite(scores).all()
    assert_same_ranking(scores, reference(method, mats))


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_dualdis_gate_modes_match_reference(gate_mode, mats, t):
    scores = run("dualdis", t, gate_mode=gate_mode)
    assert_same_ranking(scores, ref_dualdis(mats["test"], mats["query_bank"], mats["gallery_bank"], gate_mode))


def test_legacy_dualdis_is_monotone_in_the_code_product_across_rows(mats, t):
    """sign(P) log(1+|P|) is one increasing map of the code's P, so the global order is kept too."""
    scores = run("dualdis", t, gate_mode="legacy").numpy().ravel()
    product = reference("dualdis", mats, "legacy").ravel()
    np.testing.assert_allclose(scores, np.sign(product) * np.log1p(np.abs(product)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_bank_stats_match_reference(k, mats, t):
    stats = bank_stats(t["query_bank"], None, BETA_Q, k=k)
    expected_lse = np.log(np.exp(BETA_Q * mats["query_bank"]).sum(axis=0))
    np.testing.assert_allclose(stats.lse.numpy(), expected_lse, rtol=1e-12)
    np.testing.assert_array_equal(stats.occurrence.numpy(), ref_occurrence(mats["query_bank"], k))
    assert (stats.beta, stats.k, stats.n_bank) == (BETA_Q, k, N_QUERY_BANK)
    assert stats.occurrence.sum() == k * N_QUERY_BANK


@pytest.mark.parametrize("first_update", ["bank", "columns"])
def test_sinkhorn_potentials_equal_dense_reference(first_update, mats, t):
    h = sinkhorn_potentials(t["query_bank"], None, None, TAU, ITERS, first_update=first_update)
    np.testing.assert_allclose(h.numpy(), ref_sinkhorn(mats["query_bank"], TAU, ITERS, first_update), atol=1e-10)


def test_float32_matches_float64(t):
    for method in METHODS:
        low = normalize(t["test"].float(), method, **{n: t[n].float() for n in BANKS_NEEDED[method]})
        high = normalize(t["test"], method, **{n: t[n] for n in BANKS_NEEDED[method]})
        assert low.dtype == torch.float32 and high.dtype == torch.float64
        torch.testing.assert_close(low.double(), high, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- identities


def _with_occurrence(stats: BankStats, value: int) -> BankStats:
    occurrence = torch.full_like(stats.occurrence, value)
    return BankStats(stats.lse, occurrence, stats.beta, stats.k, stats.n_bank)


def test_dis_with_all_or_no_active_items(t):
    stats = bank_stats(t["query_bank"], None, BETA_Q)
    is_scores = normalize_scores(t["test"], "is", query_stats=stats)
    torch.testing.assert_close(normalize_scores(t["test"], "dis", query_stats=_with_occurrence(stats, 1)), is_scores)
    assert_same_ranking(normalize_scores(t["test"], "dis", query_stats=_with_occurrence(stats, 0)), t["test"])


def test_dualis_without_gallery_temperature_is_is(t):
    assert_same_ranking(run("dualis", t, beta_gallery_bank=0.0), run("is", t))


def test_dualdis_with_both_gates_on_is_dualis(t):
    query = _with_occurrence(bank_stats(t["query_bank"], None, BETA_Q), 1)
    gallery = _with_occurrence(bank_stats(t["gallery_bank"], None, BETA_G), 1)
    dualis = normalize_scores(t["test"], "dualis", query, gallery)
    for gate_mode in ("per_factor", "union", "intersection"):
        torch.testing.assert_close(normalize_scores(t["test"], "dualdis", query, gallery, gate_mode=gate_mode), dualis)
    assert_same_ranking(normalize_scores(t["test"], "dualdis", query, gallery, gate_mode="legacy"), dualis)


def test_first_sinkhorn_half_step_is_inverted_softmax(t):
    """With f = 0, one column update gives h = tau (log c - Z) with Z at beta = 1/tau: SN = tau * IS + const."""
    h = sinkhorn_potentials(t["query_bank"], None, None, TAU, 1, first_update="columns")
    sn = normalize_scores(t["test"], "sn", potentials=h)
    is_scores = normalize_scores(t["test"], "is", query_stats=bank_stats(t["query_bank"], None, 1.0 / TAU))
    torch.testing.assert_close(sn, TAU * is_scores - TAU * np.log(N_GALLERY))
    assert_same_ranking(sn, is_scores)


def test_sinkhorn_converges_to_uniform_marginals(t):
    tau, bank = 0.1, t["query_bank"]
    h = sinkhorn_potentials(bank, None, None, tau, 500, chunk_size=7)
    f = tau * (-np.log(N_QUERY_BANK) - torch.logsumexp((bank + h) / tau, dim=1))
    plan = torch.exp((bank + f[:, None] + h[None, :]) / tau)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((N_QUERY_BANK,), 1.0 / N_QUERY_BANK, dtype=plan.dtype))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((N_GALLERY,), 1.0 / N_GALLERY, dtype=plan.dtype))


def test_nnn_equals_the_loop_reference_and_scores_one_query_at_a_time(mats, t):
    expected = torch.from_numpy(ref_nnn(mats["test"], mats["query_bank"], NNN_ALPHA, NNN_K))
    whole = run("nnn", t)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-12)  # the scores themselves, not only the order
    bias = nnn_bias(t["query_bank"], None, NNN_ALPHA, NNN_K, chunk_size=3)  # top-k kept across bank blocks
    one_by_one = torch.cat([normalize_scores(t["test"][q : q + 1], "nnn", bias=bias) for q in range(N_QUERY)])
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-12)
    # k = 1 subtracts alpha times each item's best reference score; alpha = 0 is the raw matrix.
    top1 = t["query_bank"].max(dim=0).values
    torch.testing.assert_close(nnn_bias(t["query_bank"], None, 0.5, 1, chunk_size=7), 0.5 * top1)
    torch.testing.assert_close(run("nnn", t, nnn_alpha=0.0), t["test"])


# ---------------------------------------------------------------------------------------- streaming, sources


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_invariance(chunk_size, t):
    stats = bank_stats(t["query_bank"], None, BETA_Q, k=2, chunk_size=chunk_size)
    whole = bank_stats(t["query_bank"], None, BETA_Q, k=2, chunk_size=N_QUERY_BANK)
    torch.testing.assert_close(stats.lse, whole.lse, rtol=1e-13, atol=1e-13)
    assert torch.equal(stats.occurrence, whole.occurrence)
    h = sinkhorn_potentials(t["query_bank"], None, None, TAU, ITERS, chunk_size=chunk_size)
    torch.testing.assert_close(h, sinkhorn_potentials(t["query_bank"], None, None, TAU, ITERS), rtol=1e-12, atol=1e-13)
    gallery = bank_stats(t["gallery_bank"], None, BETA_G)
    cases = [("dis", {}), ("dualdis", {"gate_mode": "per_factor"}), ("dualdis", {"gate_mode": "legacy"})]
    for method, kwargs in cases + [("sn", {"potentials": h})]:
        chunked = normalize_scores(t["test"], method, whole, gallery, chunk_size=chunk_size, **kwargs)
        whole_rows = normalize_scores(t["test"], method, whole, gallery, chunk_size=N_QUERY, **kwargs)
        torch.testing.assert_close(chunked, whole_rows, rtol=1e-14, atol=0)  # SIMD tails may differ by an ulp


def test_block_function_sources_equal_tensor_source(emb, t):
    bank = t["query_bank"]
    from_tensor = bank_stats(bank, None, BETA_Q, chunk_size=8)
    from_blocks = bank_stats(tensor_blocks(bank), N_QUERY_BANK, BETA_Q, chunk_size=8)
    q_emb, g_emb = torch.from_numpy(emb["query_bank"]), torch.from_numpy(emb["gallery"])
    from_emb = bank_stats(embedding_blocks(q_emb, g_emb), N_QUERY_BANK, BETA_Q, chunk_size=8)
    for stats in (from_blocks, from_emb):
        torch.testing.assert_close(stats.lse, from_tensor.lse)
        assert torch.equal(stats.occurrence, from_tensor.occurrence)
    h = sinkhorn_potentials(bank, None, None, TAU, ITERS)
    torch.testing.assert_close(sinkhorn_potentials(tensor_blocks(bank), N_QUERY_BANK, N_GALLERY, TAU, ITERS), h)


def test_block_function_banks_in_normalize(t):
    for method in METHODS:
        blocks = {name: (tensor_blocks(t[name]), t[name].shape[0]) for name in BANKS_NEEDED[method]}
        tensors = {name: t[name] for name in BANKS_NEEDED[method]}
        torch.testing.assert_close(normalize(t["test"], method, **blocks), normalize(t["test"], method, **tensors))


def test_inputs_are_never_modified(t):
    before = {name: m.clone() for name, m in t.items()}
    for method in METHODS:
        for gate_mode in GATE_MODES:
            run(method, t, gate_mode=gate_mode)
    stats = bank_stats(t["query_bank"], None, BETA_Q)
    stats_before = (stats.lse.clone(), stats.occurrence.clone())
    h = sinkhorn_potentials(t["query_bank"], None, None, TAU, ITERS)
    h_before = h.clone()
    normalize_scores(t["test"], "dis", query_stats=stats)
    normalize_scores(t["test"], "dualdis", stats, stats, gate_mode="legacy")
    out = normalize_scores(t["test"], "none")
    normalize_scores(t["test"], "sn", potentials=h)
    to_cosine_scale(t["test"], "cosine")
    assert out.data_ptr() != t["test"].data_ptr()
    for name, m in t.items():
        assert torch.equal(m, before[name]), name
    assert torch.equal(stats.lse, stats_before[0]) and torch.equal(stats.occurrence, stats_before[1])
    assert torch.equal(h, h_before)


# ------------------------------------------------------------------------------------------------- scale


def test_logit_inputs_are_finite_after_conversion(t):
    logits = {name: (100.0 * m).float() for name, m in t.items()}
    converted = {name: to_cosine_scale(m, "logit", 100.0) for name, m in logits.items()}
    for method in METHODS:
        for gate_mode in GATE_MODES:
            kwargs = {"beta_query_bank": 100.0, "beta_gallery_bank": 100.0, "tau": 0.01, "gate_mode": gate_mode}
            banks = {name: converted[name] for name in BANKS_NEEDED[method]}
            scores = normalize(converted["test"], method, **banks, **kwargs)
            assert torch.isfinite(scores).all(), (method, gate_mode)
            raw = {name: logits[name] for name in BANKS_NEEDED[method]}
            direct = normalize(logits["test"], method, **raw, **kwargs, sim_scale="logit", logit_scale=100.0)
            torch.testing.assert_close(direct, scores)


def test_scale_guard_rejects_logits_and_nonfinite(t):
    logits = 100.0 * t["test"]
    with pytest.raises(ValueError, match="sim_scale='logit'"):
        check_cosine_scale(logits, "test")
    with pytest.raises(ValueError, match="sim_scale='logit'"):
        normalize(logits, "is", query_bank=t["query_bank"])
    with pytest.raises(ValueError, match="cosine scale"):
        bank_stats(100.0 * t["query_bank"], None, BETA_Q)
    broken = t["test"].clone()
    broken[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_cosine_scale(broken)
    with pytest.raises(ValueError, match="logit_scale"):
        to_cosine_scale(logits, "logit")
    with pytest.raises(ValueError, match="'cosine' or 'logit'"):
        to_cosine_scale(logits, "percent")
    check_cosine_scale(t["test"])
    assert to_cosine_scale(t["test"], "cosine").data_ptr() != t["test"].data_ptr()


# -------------------------------------------------------------------------------------------- validation


def test_validation_errors(t):
    stats = bank_stats(t["query_bank"], None, BETA_Q)
    with pytest.raises(ValueError, match="unknown hubness method"):
        normalize_scores(t["test"], "qbnorm")
    with pytest.raises(ValueError, match="needs query_stats"):
        normalize_scores(t["test"], "is")
    with pytest.raises(ValueError, match="needs gallery_stats"):
        normalize_scores(t["test"], "dualis", query_stats=stats)
    with pytest.raises(ValueError, match="needs potentials"):
        normalize_scores(t["test"], "sn")
    with pytest.raises(ValueError, match="needs bias"):
        normalize_scores(t["test"], "nnn")
    with pytest.raises(ValueError, match=r"nnn k must be in \[1, 50\]"):
        normalize(t["test"], "nnn", query_bank=t["query_bank"], nnn_k=51)
    with pytest.raises(ValueError, match="nnn alpha"):
        nnn_bias(t["query_bank"], None, -1.0, 2)
    with pytest.raises(ValueError, match="gallery columns"):
        normalize_scores(t["test"][:, :20], "is", query_stats=stats)
    with pytest.raises(ValueError, match="potentials has shape"):
        normalize_scores(t["test"], "dbsn", potentials=torch.zeros(N_GALLERY + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate_mode"):
        normalize_scores(t["test"], "dualdis", stats, stats, gate_mode="paper")
    with pytest.raises(ValueError, match="needs gallery_bank"):
        normalize(t["test"], "dualdis", query_bank=t["query_bank"])
    with pytest.raises(ValueError, match="row count"):
        bank_stats(tensor_blocks(t["query_bank"]), None, BETA_Q)
    with pytest.raises(ValueError, match="columns, expected"):
        sinkhorn_potentials(t["query_bank"], None, N_GALLERY + 1, TAU, 1)
    with pytest.raises(ValueError, match="rows"):
        normalize(t["test"], "dbsn", query_bank=t["query_bank"], query_gallery_bank=t["query_gallery_bank"][:10])
    with pytest.raises(ValueError, match="columns, expected 30"):
        normalize(t["test"], "dbsn", query_bank=t["query_bank"][:, :20], query_gallery_bank=t["query_gallery_bank"])
    assert set(BANKS_NEEDED) == set(METHODS)
