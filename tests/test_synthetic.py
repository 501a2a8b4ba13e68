"""The planted-feature generator keeps its hierarchy and rates; the metrics give known answers on hand-built SAEs
(the true dictionary: recovery 1, absorption 0, F1 1; child latents that absorbed their parent: absorption 1/√2)."""

import math

import pytest
import torch

from saelab.config import SAEConfig
from saelab.sae import SparseAutoencoder
from saelab.synthetic import TreeSpec, generate, score


def test_tree_hierarchy_rates_and_directions():
    spec = TreeSpec()
    data = generate(spec, 20000, seed=0)
    fires = data.codes > 0
    children = (data.parent >= 0).nonzero().squeeze(1)
    assert len(children) == 9 and spec.n_features == 20
    for c in children:  # a child fires only with its parent
        assert not (fires[:, c] & ~fires[:, data.parent[c]]).any()
    for p in range(3):  # siblings are mutually exclusive; each fires ~p_child of its parent's rows
        kids = fires[:, data.parent == p]
        assert kids.sum(1).max() <= 1
        rate = kids.float().sum(0) / fires[:, p].sum()
        assert torch.allclose(rate, torch.full_like(rate, 0.2), atol=0.03)
    top = torch.cat([torch.arange(3), torch.arange(12, 20)])
    assert (fires[:, top].sum(1) == 1).all()  # the top level is mutually exclusive; the defaults' rates sum to 1
    assert abs(float(fires[:, :3].float().mean()) - 0.2) < 0.01
    assert abs(float(fires[:, 12:].float().mean()) - 0.05) < 0.01
    torch.testing.assert_close(data.features @ data.features.T, torch.eye(20), atol=1e-5, rtol=0)  # orthonormal
    torch.testing.assert_close(data.x, data.codes @ data.features)  # noise 0: x is the sum of its features
    assert abs(float(fires.sum(1).float().mean()) - 1.36) < 0.05  # the paper's expected L0
    f = generate(TreeSpec(corr=0.6), 10, seed=0).features
    kids = f[3:12] @ f[3:12].T
    same = kids[~torch.eye(9, dtype=torch.bool)]
    assert abs(float(same.mean()) - 0.6) < 0.1  # same-level features at cosine ≈ ε (the shared direction is not ⟂)


def test_independent_parents_co_fire_at_the_planted_rates():
    """parents='independent': each parent fires on its own. Against a brute-force count: the pairwise co-firing
    rates are p_i·p_j, the number of parents per row follows the distribution enumerated over all 2^11 parent
    subsets, and each child still fires only with its parent, at p_child of its rows, one sibling at most."""
    import itertools

    spec = TreeSpec(parents="independent")
    n_rows = 40000
    data = generate(spec, n_rows, seed=3)
    fires = data.codes > 0
    top = torch.cat([torch.arange(3), torch.arange(12, 20)])
    p = [spec.p_parent] * 3 + [spec.p_leaf] * 8
    on = fires[:, top].double()
    co = on.T @ on / n_rows  # [11, 11] empirical P(i and j)
    for i, j in itertools.combinations(range(11), 2):
        se = (p[i] * p[j] * (1 - p[i] * p[j]) / n_rows) ** 0.5
        assert abs(float(co[i, j]) - p[i] * p[j]) < 5 * se, (i, j)
    for i in range(11):
        assert abs(float(co[i, i]) - p[i]) < 5 * (p[i] * (1 - p[i]) / n_rows) ** 0.5, i
    want = [0.0] * 12  # P(m parents in a row), summed over every subset of the 11 parents
    for subset in itertools.product((0, 1), repeat=11):
        want[sum(subset)] += math.prod(q if s else 1 - q for q, s in zip(p, subset))
    got = torch.bincount(on.sum(1).long(), minlength=12).double() / n_rows
    for m in range(12):
        assert abs(float(got[m]) - want[m]) < 5 * (want[m] * (1 - want[m]) / n_rows) ** 0.5 + 1e-9, m
    assert float(got[2:].sum()) > 0.2  # rows with co-firing parents are common (the exclusive tree has none)
    for c in (data.parent >= 0).nonzero().squeeze(1):
        par = fires[:, data.parent[c]]
        assert not (fires[:, c] & ~par).any()  # only with its parent
        rate = float(fires[par, c].float().mean())
        assert abs(rate - spec.p_child) < 5 * (0.2 * 0.8 / int(par.sum())) ** 0.5
    for q in range(3):
        assert fires[:, data.parent == q].sum(1).max() <= 1  # siblings stay mutually exclusive
    torch.testing.assert_close(data.x, data.codes @ data.features)
    exclusive = generate(TreeSpec(), n_rows, seed=3)  # same features either way; the default stays one per row
    torch.testing.assert_close(exclusive.features, data.features)
    assert ((exclusive.codes[:, top] > 0).sum(1) == 1).all()


def test_tree_spec_rejects_bad_parent_modes_and_rates():
    from saelab.errors import ConfigError

    with pytest.raises(ConfigError, match="parents"):
        TreeSpec(parents="both")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        TreeSpec(p_parent=0.3)  # 3·0.3 + 8·0.05 > 1: impossible with one parent per row ...
    assert TreeSpec(p_parent=0.3, parents="independent").p_parent == 0.3  # ... fine when parents are independent
    with pytest.raises(ConfigError, match="p_leaf"):
        TreeSpec(p_leaf=1.5, parents="independent")


def _sae_with(decoder: torch.Tensor, threshold: float = 0.0) -> SparseAutoencoder:
    n, d = decoder.shape
    sae = SparseAutoencoder(SAEConfig(architecture="jumprelu", d_in=d, n_latents=n, k=1, normalize="none"))
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.W_enc.copy_(decoder.T)
        sae.arch.set_threshold(sae, torch.full((n,), threshold))
    return sae


def test_metrics_of_the_true_dictionary():
    data = generate(TreeSpec(), 4000, seed=1)
    m = score(_sae_with(data.features, threshold=1e-4), data)
    assert m["mean_max_cos"] == pytest.approx(1.0, abs=1e-5) and m["recovered"] == 1.0
    assert abs(m["absorption"]) < 1e-5 and m["code_f1"] == pytest.approx(1.0) and m["dead"] == 0.0


def test_absorbed_children_score_one_over_root_two():
    data = generate(TreeSpec(), 4000, seed=1)
    W = data.features.clone()
    children = (data.parent >= 0).nonzero().squeeze(1)
    W[children] = torch.nn.functional.normalize(W[children] + W[data.parent[children]], dim=1)  # child + parent
    m = score(_sae_with(W, threshold=1e-4), data)
    assert m["absorption"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert m["recovered"] < 1.0
    W[children[::2]] *= -1  # signed codes: −(child + parent) is the same absorbed latent, not a negative score
    assert score(_sae_with(W, threshold=1e-4), data)["absorption"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    W[children] = torch.nn.functional.normalize(data.features[children] - data.features[data.parent[children]], dim=1)
    assert score(_sae_with(W, threshold=1e-4), data)["absorption"] == pytest.approx(-1 / math.sqrt(2), abs=1e-5)


@pytest.mark.slow  # 1500 steps of pursuit: ~13 s
def test_mp_recovers_the_toy_tree_without_absorption(tmp_path):
    """Issue 10, the MP-SAE paper's Table 1: on the toy tree (its App. B.1 setup: 20 features in R^20, batch 200,
    Adam(0.5, 0.9375) at 3e-2, pursuit until ‖r‖ ≤ 0.05 or a repeated atom) MP's dictionary is the truth, so each
    child's latent is ⟂ its parent. 1500 steps instead of the paper's 15k (seeds 0, 1, 3 are exact by then; seed 2
    needs ~3000)."""
    from saelab.synthetic.runner import BenchSpec, run_benchmark

    row = run_benchmark(BenchSpec(seed=0), archs=("mp",), out=tmp_path, progress=False)[0]
    assert abs(row["absorption"]) < 1e-2 and row["recovered"] == 1.0
    assert row["code_f1"] > 0.99  # and the codes: each true feature's latent fires exactly where it does


@pytest.mark.slow  # two 400-step MP trainings: ~80 s of CPU
def test_mp_on_co_firing_parents_absorbs_only_when_its_steps_bind(tmp_path):
    """Issue 24: with parents that co-fire, 18 % of rows hold more than 2 features. Pursued to convergence (the
    paper's protocol) MP still learns the true dictionary; held to T = k = 2 steps, a budget those rows exceed, it
    merges children with their parents like TopK (absorption ≈ 0.5–0.7 over seeds at 400–1500 steps)."""
    from saelab.synthetic.runner import BenchSpec, run_benchmark

    tree = TreeSpec(parents="independent")
    free = run_benchmark(BenchSpec(tree=tree, steps=400), archs=("mp",), out=tmp_path / "free", progress=False)[0]
    bound = run_benchmark(BenchSpec(tree=tree, steps=400, mp_steps=2), archs=("mp",), out=tmp_path / "bound",
                          progress=False)[0]
    assert abs(free["absorption"]) < 1e-2 and free["recovered"] == 1.0 and free["parents"] == "independent"
    assert bound["absorption"] > 0.3 and bound["recovered"] < 0.9 and bound["l0"] <= 2


@pytest.mark.slow
def test_cli_bench_synthetic_writes_table_json_and_figure(tmp_path):
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "saelab.cli", "bench", "synthetic", "--archs", "topk,mp",
                          "--steps", "30", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "synthetic.json").read_text())["rows"]  # both hierarchies by default
    assert [(r["arch"], r["parents"]) for r in rows] == [("topk", "exclusive"), ("mp", "exclusive"),
                                                         ("topk", "independent"), ("mp", "independent")]
    assert all(0 <= r["dead"] <= 1 for r in rows)
    assert (tmp_path / "synthetic.html").exists() and "absorption" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "saelab.cli", "bench", "synthetic", "--archs", "gtopk"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "gtopk" in bad.stderr
