"""Dashboard bundle: writer → reader round trip against brute-force computations on planted codes.

The planted builds feed `build_bundle` a fake model and encoder: each row's tokens encode (row, position), and the
"SAE" returns the code of a dense activation array A [rows, T, F] chosen by the test, so every view can be checked
against a direct computation on A.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import saelab.dashboard as dash
from saelab.dashboard import format as fmt
from saelab.dashboard.build import DashboardSettings, build_bundle
from saelab.errors import DataError
from saelab.sae.code import SparseCode

T = 9  # tokens per row (BOS + 8 scored positions)


def planted_pass(A: np.ndarray):
    """(tokens [R, T], capture, encode) of a fake model and SAE whose codes are the non-zero entries of A."""
    R, _, F = A.shape
    tokens = (np.arange(R)[:, None] * T + np.arange(T)[None, :]).astype(np.int64)  # token id = r·T + p
    tokens[:, 0] = 0  # "BOS"
    flat = torch.from_numpy(A.reshape(R * T, F).astype(np.float32))
    K = max(1, int((A[:, 1:] != 0).sum(-1).max()))

    def capture(batch):
        return batch[:, 1:].reshape(-1, 1)  # the global token ids stand in for activations

    def encode(x):
        dense = flat[x[:, 0].long()]
        v, i = dense.abs().topk(K, dim=1)
        return SparseCode(i, dense.gather(1, i))

    return tokens, capture, encode


def planted_build(out: Path, A: np.ndarray, settings: DashboardSettings | None = None, d: int = 16, V_extra: int = 0,
                  fail_after_segments: int | None = None, run: Path | None = None, seed: int = 0,
                  group_ends: list[int] | None = None):
    """Build a bundle whose codes are the non-zero entries of A [R, T, F] (position 0 ignored)."""
    R, _, F = A.shape
    V = R * T + V_extra
    tokens, capture_ids, encode = planted_pass(A)
    calls = {"n": 0}

    def capture(batch):
        calls["n"] += 1
        if fail_after_segments is not None and calls["n"] > fail_after_segments:
            raise KeyboardInterrupt("simulated kill")
        return capture_ids(batch)

    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(F, d, generator=g)
    W_U = torch.randn(d, V, generator=g)
    gain = torch.rand(d, generator=g) + 0.5
    settings = settings or DashboardSettings(segment_rows=4, batch_rows=2, n_top=3, n_intervals=4, per_interval=2,
                                             n_random=3, bins=8, n_logits=4, n_neighbours=3, n_coact=3,
                                             latents_per_row_group=2, map_method="pca")
    info = {"n_latents": F, "hook_name": "blocks.0.hook_resid_pre", "sha256": "planted", "group_ends": group_ends}
    meta = {"model": {"name": "planted"}, "corpus": {"source": "planted", "split": "validation",
                                                     "requested_tokens": R * (T - 1)}, "spec": {"seed": seed}}
    vocab = [f"t{i}" for i in range(V)]
    rows = iter(list(tokens))
    path = build_bundle(out, rows, R, capture, encode, info, directions, (W_U, gain, True), vocab, meta,
                        settings=settings, run=run, progress=False)
    return path, {"directions": directions, "W_U": W_U, "gain": gain, "tokens": tokens, "settings": settings}


def random_codes(R=24, F=12, density=0.3, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    A = rng.exponential(1.0, size=(R, T, F)).astype(np.float32)
    if ties:
        A = np.round(A * 2) / 2  # many equal values
    A *= rng.random((R, T, F)) < density
    A[:, 0] = 0
    return A


def row_peaks_bf(A):
    """[R, F] peak value and position of each (row, latent), brute force (first position on ties)."""
    act = A[:, 1:]
    peak = act.max(1)
    pos = act.argmax(1) + 1
    return peak, pos


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    A = random_codes(R=24, F=12, ties=True)
    A[:, :, 5] = 0  # a dead latent
    A[:, 1:, 7] = 1.0 + np.random.default_rng(1).random((24, T - 1))  # a dense latent: active on every token
    out = tmp_path_factory.mktemp("b") / "bundle"
    path, extra = planted_build(out, A)
    return A, dash.open(path), extra


# ================================================================================================ statistics
def test_statistics_match_a_direct_computation(basic):
    A, b, _ = basic
    t = b.table()
    X = A[:, 1:].reshape(-1, A.shape[2])
    for i in range(A.shape[2]):
        v = X[:, i][X[:, i] != 0].astype(np.float64)
        row = t.loc[i]
        assert row["n_active"] == len(v)
        assert row["density"] == pytest.approx(len(v) / X.shape[0])
        if len(v) == 0:
            assert row["dead"] and math.isnan(row["max"])
            continue
        mu, var = v.mean(), v.var()
        assert row["max"] == pytest.approx(v.max()) and row["min"] == pytest.approx(v.min())
        assert row["mean"] == pytest.approx(mu) and row["var"] == pytest.approx(var, rel=1e-9)
        if var > 0:
            assert row["skew"] == pytest.approx(((v - mu) ** 3).mean() / var ** 1.5, rel=1e-7, abs=1e-9)
            assert row["kurtosis"] == pytest.approx(((v - mu) ** 4).mean() / var ** 2 - 3, rel=1e-7, abs=1e-9)
        assert row["n_rows"] == int((A[:, 1:, i] != 0).any(1).sum())


def test_histograms_sum_to_active_count_and_match_numpy(basic):
    A, b, _ = basic
    X = A[:, 1:].reshape(-1, A.shape[2])
    for i in range(A.shape[2]):
        lat = b.latent(i)
        v = X[:, i][X[:, i] != 0]
        assert lat.hist_counts.sum() == len(v)
        if len(v):
            # the (a, b] convention: numpy's [a, b) histogram of −v over the mirrored edges
            edges = lat.hist_edges.astype(np.float64)
            ref, _ = np.histogram(-v.astype(np.float64), bins=-edges[::-1])
            assert np.array_equal(lat.hist_counts, ref[::-1])
        assert lat.logit_hist_counts.sum() == len(b.vocab)


def test_dead_and_dense_latents(basic):
    A, b, _ = basic
    dead, dense = b.latent(5), b.latent(7)
    assert dead.stats.dead and not dead.stats.dense and dead.stats.n_active == 0
    assert dead.top == [] and dead.random == [] and all(iv.examples == [] for iv in dead.intervals)
    assert dead.hist_counts.sum() == 0 and dead.neighbours_coact == []
    assert dense.stats.dense and not dense.stats.dead and dense.stats.density == 1.0
    assert len(dense.top) == 3 and len(dense.random) == 3


# ================================================================================================ examples
def test_top_examples_are_the_top_rows(basic):
    """Brute force: rows sorted by the latent's peak, descending; ties → the earlier row (values are rounded to
    halves so ties are common)."""
    A, b, extra = basic
    peak, pos = row_peaks_bf(A)
    k = extra["settings"].n_top
    for i in range(A.shape[2]):
        rows = [r for r in range(A.shape[0]) if (A[r, 1:, i] != 0).any()]
        want = sorted(rows, key=lambda r: (-peak[r, i], r))[:k]
        got = b.latent(i).top
        assert [e.row for e in got] == want
        for e in got:
            assert e.act == pytest.approx(peak[e.row, i]) and e.pos == pos[e.row, i]
            assert np.allclose(e.acts, A[e.row, :, i])  # sparse activations rebuild the dense row exactly
            assert np.array_equal(e.tokens, extra["tokens"][e.row])


def test_interval_examples_lie_in_their_bins(basic):
    A, b, extra = basic
    s = extra["settings"]
    peak, _ = row_peaks_bf(A)
    for i in range(A.shape[2]):
        lat = b.latent(i)
        if lat.stats.dead:
            continue
        assert sum(iv.contains for iv in lat.intervals) == pytest.approx(1.0, abs=1e-6)  # all values positive
        assert lat.intervals[-1].hi == pytest.approx(lat.stats.max)
        for iv in lat.intervals:
            in_bin = [r for r in range(A.shape[0]) if peak[r, i] > 0 and iv.lo < peak[r, i] <= iv.hi
                      or (iv.index == 0 and 0 < peak[r, i] <= iv.hi)]
            # rounding of the float32 edges may move a boundary value; the counts must match up to that
            assert abs(iv.n_rows - len(in_bin)) <= 1
            assert len(iv.examples) == min(s.per_interval, iv.n_rows)
            for e in iv.examples:
                assert iv.lo <= e.act <= iv.hi
            assert len({e.row for e in iv.examples}) == len(iv.examples)


def test_random_examples_are_uniform():
    """χ² on a planted case: 60 latents all active on every one of 40 rows, 5 random rows each → each row
    expected 7.5 times; each latent's draws are distinct rows."""
    R, F = 40, 60
    A = np.zeros((R, T, F), np.float32)
    A[:, 3, :] = 1.0 + np.random.default_rng(0).random((R, F))
    s = DashboardSettings(segment_rows=16, batch_rows=8, n_top=1, n_intervals=2, per_interval=1, n_random=5,
                          bins=4, n_logits=2, n_neighbours=1, n_coact=1, map_method="pca")
    out = Path(__import__("tempfile").mkdtemp()) / "b"
    try:
        path, _ = planted_build(out, A, settings=s)
        b = dash.open(path)
        counts = np.zeros(R)
        for i in range(F):
            rows = [e.row for e in b.latent(i).random]
            assert len(rows) == 5 == len(set(rows))
            counts[rows] += 1
        expected, p = F * 5 / R, 5 / R
        # each latent draws 5 distinct rows, so a row's count is Binomial(F, p): variance expected·(1 − p)
        chi2 = ((counts - expected) ** 2 / (expected * (1 - p))).sum()
        # df = 39: the 0.1 % and 99.9 % points of χ²(39) are 17.9 and 72.1 (a sampler stuck on a few rows fails)
        assert 17.9 < chi2 < 72.1, chi2
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


# ================================================================================================ weights
def test_logit_lens_equals_direct_computation(basic):
    A, b, extra = basic
    d = extra["directions"]
    eff = ((d - d.mean(1, keepdim=True)) * extra["gain"]) @ extra["W_U"]
    eff = eff - eff.mean(1, keepdim=True)
    for i in range(A.shape[2]):
        lat = b.latent(i)
        order = torch.argsort(eff[i], descending=True)
        assert [t.token for t in lat.logits_top] == order[:4].tolist()
        assert [t.token for t in lat.logits_bottom] == order.flip(0)[:4].tolist()
        assert lat.logits_top[0].value == pytest.approx(float(eff[i].max()), rel=1e-5)
        assert lat.logits_top[0].text == b.vocab[lat.logits_top[0].token]


def test_decoder_neighbours_equal_dense_cosine_argsort(basic):
    A, b, extra = basic
    d = extra["directions"]
    u = d / d.norm(dim=1, keepdim=True)
    cos = u @ u.T
    cos.fill_diagonal_(-2)
    for i in range(A.shape[2]):
        got = b.latent(i).neighbours_decoder
        order = torch.argsort(cos[i], descending=True)[:3]
        assert [n.latent for n in got] == order.tolist()
        assert np.allclose([n.value for n in got], cos[i, order].numpy(), atol=1e-6)


def test_decoder_map_is_pca_of_unit_directions(basic):
    _, b, extra = basic
    xy, method = b.decoder_map()
    assert method == "pca" and xy.shape == (12, 2)
    u = extra["directions"] / extra["directions"].norm(dim=1, keepdim=True)
    c = (u - u.mean(0)).double()
    _, _, V = torch.linalg.svd(c, full_matrices=False)
    ref = (c @ V[:2].T).numpy()
    for j in range(2):  # equal up to the sign of each component
        assert np.allclose(np.abs(xy[:, j]), np.abs(ref[:, j]), atol=1e-5)


# ================================================================================================ co-activation, tokens
@pytest.mark.parametrize("max_cells", [30, 1 << 26])  # blocks of 2 latents over sorted entries; one counter
def test_coactivation_equals_brute_force(tmp_path, max_cells):
    A = random_codes(R=20, F=10, density=0.4, seed=3)
    s = DashboardSettings(segment_rows=4, batch_rows=2, n_top=2, n_intervals=2, per_interval=1, n_random=1,
                          bins=4, n_logits=2, n_neighbours=2, n_coact=9, map_method="pca", coact_max_cells=max_cells)
    path, _ = planted_build(tmp_path / "b", A, settings=s)
    b = dash.open(path)
    act = (A[:, 1:] != 0).reshape(-1, A.shape[2]).astype(np.int64)
    C = act.T @ act
    n = np.diag(C)
    for i in range(A.shape[2]):
        got = {x.latent: (x.count, x.value) for x in b.latent(i).neighbours_coact}
        want = {j: (C[i, j], C[i, j] / (n[i] + n[j] - C[i, j])) for j in range(A.shape[2]) if j != i and C[i, j]}
        assert set(got) == set(want)
        for j in got:
            assert got[j][0] == want[j][0] and got[j][1] == pytest.approx(want[j][1], rel=1e-6)
        vals = [x.value for x in b.latent(i).neighbours_coact]
        assert vals == sorted(vals, reverse=True)


def test_token_index_lists_latents_peaking_on_a_token(basic):
    A, b, extra = basic
    want: dict[int, dict[int, list[float]]] = {}
    for i in range(A.shape[2]):
        for e in b.latent(i).top:
            want.setdefault(int(e.tokens[e.pos]), {}).setdefault(i, []).append(e.act)
    for tok, lats in want.items():
        got = b.latents_for_token(tok)
        got_by_latent = {g.latent: (g.act, g.hits) for g in got}
        assert sorted(got_by_latent) == sorted(lats)
        for i, v in lats.items():  # pytest.approx compares flat mappings only (pytest ≥ 9.2 refuses nested ones)
            assert got_by_latent[i][0] == pytest.approx(max(v)) and got_by_latent[i][1] == len(v)
        assert [g.act for g in got] == sorted([g.act for g in got], reverse=True)
    assert b.latents_for_token(b.vocab[int(next(iter(want)))])  # by display string too
    assert b.latents_for_token("no such token") == []


# ================================================================================================ format, resume
def test_manifest_is_complete_and_files_are_described(basic):
    _, b, _ = basic
    m = b.manifest
    assert m["format"] == fmt.FORMAT and m["schema_version"] == fmt.SCHEMA_VERSION
    assert m["corpus"]["tokens"] == 24 * (T - 1) and m["sae"]["n_latents"] == 12
    assert not (b.path / fmt.WORK).exists()
    for name in m["files"]:
        assert (b.path / name).exists()
    # examples.parquet row groups hold whole latents (2 per group here), so a latent is one read
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(b.path / fmt.EXAMPLES)
    for g in range(pf.metadata.num_row_groups):
        lats = set(pf.read_row_group(g, columns=["latent"]).column(0).to_pylist())
        assert len({l // 2 for l in lats}) == 1


def _bundle_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.iterdir()):
        if p.name == fmt.MANIFEST:
            m = json.loads(p.read_text())
            for volatile in ("created", "timings"):
                m.pop(volatile)
            out[p.name] = json.dumps(m, sort_keys=True).encode()
        elif p.suffix == ".parquet":
            import pyarrow.parquet as pq

            out[p.name] = repr(pq.read_table(p).to_pydict()).encode()
        else:
            out[p.name] = p.read_bytes()
    return out


def test_resume_after_a_kill_gives_the_same_bundle(tmp_path):
    A = random_codes(R=22, F=8, seed=5)
    clean, _ = planted_build(tmp_path / "clean", A)
    with pytest.raises(KeyboardInterrupt):  # killed in the third segment (2 forwards per segment)
        planted_build(tmp_path / "resumed", A, fail_after_segments=5)
    half = tmp_path / "resumed"
    assert not (half / fmt.MANIFEST).exists() and (half / fmt.WORK).exists()
    with pytest.raises(DataError, match="did not finish"):
        dash.open(half)
    resumed, _ = planted_build(tmp_path / "resumed", A)
    assert _bundle_bytes(clean) == _bundle_bytes(resumed)


def test_a_half_built_bundle_of_other_settings_restarts_cleanly(tmp_path):
    A = random_codes(R=12, F=6, seed=6)
    with pytest.raises(KeyboardInterrupt):
        planted_build(tmp_path / "b", A, fail_after_segments=2, seed=1)
    path, _ = planted_build(tmp_path / "b", A, seed=2)  # a different spec: the work folder is wiped
    clean, _ = planted_build(tmp_path / "c", A, seed=2)
    assert _bundle_bytes(path) == _bundle_bytes(clean)
    again, _ = planted_build(tmp_path / "b", A, seed=2)  # finished and identical: found, not rebuilt
    assert again == path
    with pytest.raises(DataError, match="another SAE"):
        planted_build(tmp_path / "b", A, seed=3)


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a dashboard bundle"):
        planted_build(tmp_path, random_codes(R=4, F=3))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_scores_are_joined_by_latent_id(tmp_path):
    import pandas as pd

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    A = random_codes(R=8, F=6)
    path, _ = planted_build(tmp_path / "b", A, run=run)  # no scores yet
    assert "steering_scores.input_score" not in dash.open(path).table().columns
    # as saelab.eval.steering writes them: a per-latent table and its settings sidecar
    pd.DataFrame({"latent": [1, 4, 3], "input_score": [0.5, 0.1, np.nan], "output_score": [0.25, 0.9, 0.4],
                  "lens_tokens": [[1, 2], [3], [4]]}).to_parquet(run / "eval" / "steering_scores.parquet")
    (run / "eval" / "steering_scores.json").write_text(json.dumps({"prompt": "x", "n_tokens": 100}))
    (run / "eval" / "circuit_ioi.json").write_text(json.dumps({"latents": [{"latent": 2, "layer": 1},
                                                                          {"latent": 5}]}))
    (run / "eval" / "probing_sentiment.json").write_text(json.dumps({"2": 0.7}))
    (run / "eval" / "probing_broken.json").write_text("{not json")
    path, _ = planted_build(tmp_path / "b", A, run=run)  # the finished bundle: scores joined again, not rebuilt
    b = dash.open(path)
    t = b.table()
    assert t.loc[1, "steering_scores.input_score"] == 0.5 and t.loc[4, "steering_scores.output_score"] == 0.9
    assert math.isnan(t.loc[0, "steering_scores.input_score"])
    assert "steering_scores.lens_tokens" not in t.columns  # lists are not scores
    assert b.latent(2).scores == {"circuit_ioi.layer": 1, "circuit_ioi.member": True, "probing_sentiment.score": 0.7}
    assert b.latent(5).scores == {"circuit_ioi.member": True}
    assert b.manifest["scores"]["skipped"] == ["probing_broken.json"]
    assert set(b.manifest["scores"]["joined"]) == {"steering_scores.parquet", "circuit_ioi.json",
                                                   "probing_sentiment.json"}


def test_neuronpedia_export(basic):
    A, b, _ = basic
    j = b.to_neuronpedia(0)
    json.dumps(j)  # plain JSON
    lat = b.latent(0)
    assert j["maxActApprox"] == pytest.approx(lat.stats.max)
    assert len(j["activations"]) == len(lat.top) + sum(len(iv.examples) for iv in lat.intervals)
    assert j["activations"][0]["binMin"] == -1 and j["activations"][0]["maxValue"] == pytest.approx(lat.top[0].act)
    assert sum(j["freq_hist_data_bar_heights"]) == lat.stats.n_active


def test_reader_rejects_bad_latent_ids(basic):
    _, b, _ = basic
    with pytest.raises(DataError, match="does not exist"):
        b.latent(12)
    with pytest.raises(DataError):
        b.latent("x")


# ================================================================================================ dead latents
def test_dead_latents_by_matryoshka_group_on_a_planted_bundle(tmp_path):
    A = random_codes(R=16, F=12, density=0.3, seed=4)
    A[..., [0, 5, 6, 7, 11]] = 0  # dead: 1 of group [0, 2), 3 of [2, 8), 1 of [8, 12)
    A[3, 4, 6] = 0.5  # ... but latent 6 fires once: alive (density 1/(16·8))
    ends = [2, 8, 12]
    path, _ = planted_build(tmp_path / "b", A, group_ends=ends)
    d = dash.open(path).manifest["dead_latents"]
    assert d["n_tokens"] == 16 * (T - 1) and d["n_latents"] == 12 and d["lowest_visible_density"] == 1 / (16 * 8)
    assert d["n_dead"] == 4 and d["frac_dead"] == pytest.approx(4 / 12)
    assert [(g["latents"], g["n_dead"]) for g in d["groups"]] == [([0, 2], 1), ([2, 8], 2), ([8, 12], 1)]
    assert [g["frac_dead"] for g in d["groups"]] == pytest.approx([1 / 2, 2 / 6, 1 / 4])
    assert d["window"].startswith("the dashboard's window: 128 tokens")
    from saelab.dashboard.stats import format_dead

    assert format_dead(d) == ("4 dead (33.33 %) in " + d["window"] + "; by Matryoshka group [0, 2) 50.0 %, "
                              "[2, 8) 33.3 %, [8, 12) 25.0 %")
    from saelab.dashboard.run import summary

    assert f"dead       {format_dead(d)}" in summary(path).splitlines()  # the CLI's summary says the window


def test_streamed_firing_counts_equal_the_bundle_and_a_brute_force_count(tmp_path):
    from saelab.dashboard.stats import firing_counts

    A = random_codes(R=10, F=9, density=0.05, seed=2)
    A[..., 3] = 0
    tokens, capture, encode = planted_pass(A)
    B = A.copy()
    B[..., :4] *= 2.0  # a second "SAE" on the same activations: other values, the same firing
    B[:, 1:, 8] = 0
    _, _, encode_b = planted_pass(B)
    (ca, cb), n_tok = firing_counts(iter(list(tokens)), 7, capture, [encode, encode_b], [9, 9], batch_rows=3)
    assert n_tok == 7 * (T - 1)
    assert ca.tolist() == (A[:7, 1:] != 0).sum((0, 1)).tolist() and ca[3] == 0  # brute force on the first 7 rows
    assert cb.tolist() == (B[:7, 1:] != 0).sum((0, 1)).tolist() and cb[8] == 0
    path, _ = planted_build(tmp_path / "b", A[:7])
    assert dash.open(path).table()["n_active"].tolist() == ca.tolist()  # the dashboard's count of the same rows


def test_matryoshka_groups_and_the_training_rows_a_run_read(tmp_path, reference_tokenizer):
    import dataclasses
    import json

    from saelab.activations.format import FORMAT, MANIFEST, SCHEMA_VERSION
    from saelab.config import SAEConfig
    from saelab.dashboard.run import heldout_rows, train_rows_read
    from saelab.dashboard.stats import group_ends
    from saelab.data.corpus import CorpusSpec
    from saelab.data.packing import iter_packed_rows
    from saelab.sae import SparseAutoencoder

    mat = SparseAutoencoder(SAEConfig(d_in=8, n_latents=64, k=4, hook_name="h", architecture="matryoshka"))
    assert group_ends(mat) == [2, 6, 14, 30, 64]  # 64 × cumulative 1/32, 1/16, 1/8, 1/4, rest
    assert group_ends(SparseAutoencoder(SAEConfig(d_in=8, n_latents=64, k=4, hook_name="h"))) is None
    sampled = SAEConfig(d_in=8, n_latents=64, k=4, hook_name="h", architecture="matryoshka",
                        options={"random_prefixes": 3})
    assert group_ends(SparseAutoencoder(sampled)) is None  # no fixed groups

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3)
    corpus = CorpusSpec(str(docs), validation_per_mille=250)
    cache = tmp_path / "cache"
    cache.mkdir()
    spec = {"split": "train", "context_size": 16, "corpus": dataclasses.asdict(corpus)}
    (cache / MANIFEST).write_text(json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION, "spec": spec,
                                              "n_sequences": 5}))
    run = tmp_path / "run"
    assert train_rows_read(run, {"cache": str(cache)}, corpus, 16) == 5
    assert train_rows_read(run, {"cache": str(cache)}, corpus, 32) is None  # another row length
    assert train_rows_read(run, {"source": "stream"}, corpus, 16) is None
    assert train_rows_read(run, {}, corpus, 16) is None  # no RUN/cache
    val = list(iter_packed_rows(corpus, reference_tokenizer, 16, "validation"))
    train = list(iter_packed_rows(corpus, reference_tokenizer, 16, "train"))
    got = list(heldout_rows(corpus, reference_tokenizer, 16, 5))
    assert len(val) > 0 and len(train) > 5 and len(got) == len(val) + len(train) - 5
    assert all((a == b).all() for a, b in zip(got, val + train[5:]))
    assert len(list(heldout_rows(corpus, reference_tokenizer, 16, None))) == len(val)


# ================================================================================================ real model
@pytest.mark.slow
def test_run_bundle_on_the_reference_model(tmp_path):
    """A random SAE on the reference model: example activations equal sae.encode of the model's activations."""
    import saelab
    from saelab.activations.capture import HookCapture
    from saelab.config import SAEConfig
    from saelab.dashboard.run import build_run_bundle
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=128, k=8, hook_name="blocks.1.hook_resid_post"))
    sae.reset_parameters(seed=0)
    sae.save(tmp_path / "sae")
    s = DashboardSettings(segment_rows=4, batch_rows=4, n_top=3, n_random=2, per_interval=2)
    path = build_run_bundle(tmp_path / "sae", tokens=10 * 63, context_size=64, settings=s, progress=False)
    b = dash.open(path)
    assert b.tokens.shape == (10, 64) and b.manifest["settings"]["logit_lens"]
    model = saelab.load_model("reference")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    acts, _ = HookCapture(model, [sae.cfg.hook_name])(torch.from_numpy(np.asarray(b.tokens, dtype=np.int64)))
    dense = loaded.encode(acts[sae.cfg.hook_name]).to_dense(128).view(10, 63, 128)
    i = int(b.table()["n_active"].idxmax())
    for e in b.latent(i).top:
        assert np.allclose(e.acts[1:], dense[e.row, :, i].numpy(), atol=1e-4)
    # the CLI: a bad run folder is one line and exit 2
    from saelab.cli import main

    assert main(["dashboard", str(tmp_path / "nothing")]) == 2
