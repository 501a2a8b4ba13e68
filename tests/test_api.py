"""The notebook API's `steer` and `patch` (saelab.api): the same results as the code the CLI runs, returned as
objects, with escaped HTML for Jupyter."""

import json

import pytest

import saelab
from saelab.errors import ConfigError, SAEFileError

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, reference_model):
    """A bare SAE directory (random weights) for the reference model: enough to steer with."""
    import numpy as np
    import pandas as pd

    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=reference_model.cfg.d_model, n_latents=32, k=8, hook_name=HOOK,
                                      normalize="none", model_name="reference"))
    sae.reset_parameters(seed=0)
    path = sae.save(tmp_path_factory.mktemp("api") / "sae")
    # max activations as `saelab eval --suite steering` leaves them: steering skips its corpus pass
    (path / "eval").mkdir()
    pd.DataFrame({"latent": range(32), "max_activation": np.linspace(1.0, 2.0, 32)}).to_parquet(
        path / "eval" / "steering_scores.parquet")
    return path


@pytest.fixture
def shared_model(monkeypatch, reference_model):
    """`load_model("reference")` hands out the session's model: the tests check results, not loading."""
    import saelab.models

    real = saelab.models.load_model

    def load(name="reference", device="cpu", dtype="float32"):
        return reference_model if name == "reference" else real(name, device=device, dtype=dtype)

    monkeypatch.setattr(saelab.models, "load_model", load)


# ------------------------------------------------------------------------------------------ steer
def test_steer_at_alpha_zero_is_the_plain_generation_and_large_alpha_changes_it(sae_dir, shared_model):
    off = saelab.steer(sae_dir, 3, alpha=0.0, prompt="def ", max_new_tokens=8)
    assert off.steered == off.unsteered and off.alphas == [0.0] and off.latents == [3]
    on = saelab.steer(sae_dir, [3], alpha=50.0, prompt="def ", max_new_tokens=8)
    assert on.unsteered == off.unsteered and on.steered != on.unsteered


def test_steer_prints_what_the_cli_prints_and_its_html_is_escaped(sae_dir, shared_model, capsys):
    from saelab.cli import main

    prompt = "if a<b & c"
    got = saelab.steer(sae_dir, [3, 5], alpha=[2.0, 4.0], prompt=prompt, max_new_tokens=5, seed=1)
    assert main(["steer", str(sae_dir), "--latent", "3", "--latent", "5", "--alpha", "2", "--alpha", "4",
                 "--prompt", prompt, "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out == str(got) + "\n"
    page = got._repr_html_()
    assert "a&lt;b &amp; c" in page and "a<b" not in page
    assert "unsteered" in page and "steered" in page


def test_steer_sweep_holds_the_written_result_and_its_figure(sae_dir, shared_model):
    sweep = saelab.steer(sae_dir, [3], sweep=True, alphas=[0, 4], prompt="x = ", max_new_tokens=4)
    written = json.loads(sweep.paths[0].read_text())
    assert written == sweep.result and sweep.alphas == [0.0, 4.0] and list(sweep.success) == [3]
    assert sweep.paths[1].suffix == ".html" and sweep.paths[1].exists()
    assert len(sweep.figure().data) == 2  # success and fluency of the one latent
    page = sweep._repr_html_()
    assert "success@20" in page and "fluency (nats)" in page
    assert str(sweep).splitlines()[0].split() == ["latent", "alpha", "success@20", "rate", "fluency", "(nats)"]


def test_steer_refuses_bad_settings_before_any_work(sae_dir):
    with pytest.raises(ConfigError, match="--mode"):
        saelab.steer(sae_dir, 3, mode="multiply")
    with pytest.raises(ConfigError, match="at least two"):
        saelab.steer(sae_dir, 3, sweep=True, alphas=[2.0])
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        saelab.steer(sae_dir, 3, max_new_tokens=0)
    with pytest.raises(SAEFileError):
        saelab.steer(sae_dir.parent / "nope", 3)


@pytest.mark.slow
def test_steer_a_run_trained_in_process(tmp_path, shared_model):
    run = saelab.train(tokens=65_536, cache_tokens=65_536, n_latents=512, eval_tokens=0, out=str(tmp_path / "run"),
                       progress=False)
    off = saelab.steer(run, 7, alpha=0.0, max_new_tokens=10)
    on = saelab.steer(run, 7, alpha=16.0, max_new_tokens=10)
    assert off.steered == off.unsteered == on.unsteered != on.steered


# ------------------------------------------------------------------------------------------ patch
def test_patch_gives_run_patching_results_as_an_object(reference_model, tmp_path):
    from saelab.eval.patching_report import run_patching

    rep = saelab.patch(reference_model, task="bracket", pairs=4, methods="activation,attribution", progress=False)
    direct = run_patching(reference_model, "bracket", 4, ["activation", "attribution"])
    assert rep.correlation == direct["correlation"] and set(rep.correlation) == {"attribution"}
    assert set(rep.correlation["attribution"]) == {"resid", "attn", "mlp", "head"}
    assert set(rep.figures) == {"scatter", "heatmap"} and "_figures" not in rep.report and not rep.paths
    assert json.loads(json.dumps(rep.to_dict()))["task"] == "bracket"
    assert str(rep).startswith("task bracket: 4 pairs")
    page = rep._repr_html_()
    assert "Pearson r" in page and "attribution" in page and "solved" in page
    assert not list(tmp_path.iterdir())  # nothing written without out=


def test_patch_with_an_sae_object_writes_the_report_where_asked(reference_model, tmp_path):
    from saelab.config import SAEConfig
    from saelab.sae import SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=128, k=8, hook_name="blocks.2.hook_resid_pre",
                                      model_name="reference"))
    sae.reset_parameters(seed=0)
    rep = saelab.patch(reference_model, pairs=4, saes=sae, methods="activation,attribution", components="resid",
                       circuit_method="attribution", max_ap_nodes=100, out=tmp_path / "o", progress=False)
    assert not any(p.requires_grad for p in sae.parameters())
    assert {"faithfulness", "sae_scatter"} <= set(rep.figures)
    assert rep.circuit["ranked_by"] == "attribution" and rep.circuit["faithfulness"][-1] is not None
    assert [p.name for p in rep.paths] == ["patching-bracket.json", "patching-bracket.html"]
    assert json.loads(rep.paths[0].read_text())["correlation"] == rep.correlation
    assert "feature circuit" in rep._repr_html_() and "SAE nodes" in rep._repr_html_()


@pytest.mark.parametrize("kw, error, match", [
    ({"methods": "activation,bogus"}, ConfigError, "--method"),
    ({"components": []}, ConfigError, "--components"),
    ({"pairs": 0}, ConfigError, "--pairs"),
    ({"circuit_method": "activation"}, ConfigError, "--circuit-method"),
    ({"relp_rules": "ln,magic"}, ConfigError, "unknown rule"),
    ({"saes": ["/no/such/run"]}, SAEFileError, "neither a run directory"),
])
def test_patch_refuses_bad_settings_before_loading_the_model(kw, error, match, monkeypatch):
    import saelab.models

    monkeypatch.setattr(saelab.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(error, match=match):
        saelab.patch("reference", **kw)


# ------------------------------------------------------------------------------------------ run, train, top activations
def test_settings_map_to_the_commands_config_keys():
    from saelab.config import CacheConfig, TrainConfig
    from saelab.settings import overrides_from_kwargs

    got = overrides_from_kwargs(TrainConfig, {"tokens": "2M", "k": 16, "arch": "batchtopk", "n_latents": 512,
                                              "model": "reference"}, "t")
    assert got == {"tokens": 2_000_000, "sae.k": 16, "sae.architecture": "batchtopk", "sae.n_latents": 512,
                   "model.name": "reference"}
    assert overrides_from_kwargs(CacheConfig, {"hooks": "a,b", "tokens": "500k"}, "c") == {"hooks": "a,b",
                                                                                          "tokens": 500_000}
    with pytest.raises(ConfigError, match="unknown setting 'nlatents'"):
        saelab.train(nlatents=5)
    with pytest.raises(ConfigError, match="tokens: not a count"):
        saelab.train(tokens="lots")


def test_run_of_a_missing_or_wrong_directory_is_one_clear_error(tmp_path):
    with pytest.raises(SAEFileError, match="no such directory"):
        saelab.Run(tmp_path / "nope")
    with pytest.raises(SAEFileError, match="neither a run directory"):
        saelab.Run(tmp_path)


def test_run_reads_what_the_directory_holds(sae_dir):
    run = saelab.Run(sae_dir)
    assert run.sae.cfg.n_latents == 32 and run.config is None and run.history == [] and run.core is None
    assert run.bundle is None and "saelab run" in run._repr_html_() and "<td" in run._repr_html_()


def test_top_activations_from_the_model_match_a_brute_force_scan(sae_dir, reference_model):
    import torch

    from saelab.data.corpus import CorpusSpec
    from saelab.eval.splice import corpus_rows

    sae = saelab.load_sae(sae_dir)
    got = saelab.top_activations(saelab.Run(sae_dir), 7, n=3, model=reference_model, tokens=2048)
    rows = corpus_rows(reference_model, CorpusSpec(), "validation", 128, 16)
    _, cache = reference_model.run_with_cache(rows, names_filter=HOOK)
    x = cache[HOOK][:, 1:].reshape(-1, sae.cfg.d_in)
    z = sae.encode(x).to_dense(32)[:, 7].reshape(16, -1)  # BOS (position 0) never scored
    peak, pos = z.max(1)
    want = torch.argsort(-peak, stable=True)[:3]
    assert [e.row for e in got.examples] == want.tolist()
    assert [e.pos for e in got.examples] == (pos[want] + 1).tolist()
    torch.testing.assert_close(torch.tensor([e.act for e in got.examples]), peak[want], rtol=1e-5, atol=1e-6)
    html = got._repr_html_()
    assert html.count("<span") == sum(t - s for s, t in (e.window(12) for e in got.examples))
    assert len(got.texts()) == 3


# ------------------------------------------------------------------------------------------ the commands' checks
@pytest.mark.parametrize("call, match", [
    (lambda: saelab.info(rows=0), "--rows: must be > 0, got 0"),
    (lambda: saelab.info(context_size=1), "--context-size: must be >= 2"),
    (lambda: saelab.bench_synthetic(archs="topk,gtopk"), "--archs: 'gtopk' is not an architecture"),
    (lambda: saelab.bench_synthetic(corr=1.0), r"--corr: must be in \[0, 1\)"),
    (lambda: saelab.calibrate("/no/such/run", dataset="x", tokens="0"), "--tokens: must be > 0, got 0"),
    (lambda: saelab.evaluate("/no/such/run", suites="probing", max_density=0), r"--max-density: must be in \(0, 1\]"),
    (lambda: saelab.evaluate("/no/such/run", tokens=0), "--tokens: must be > 0, got 0"),
    (lambda: saelab.steer("/no/such/run", 1, temperature=-1), "--temperature: must be >= 0"),
])
def test_the_api_refuses_what_the_command_refuses_before_loading_anything(call, match, monkeypatch):
    """The checks live in the API (or its settings dataclass), so a notebook gets the command's ConfigError, before
    any model or run is read."""
    import saelab.models

    monkeypatch.setattr(saelab.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=match):
        call()


def test_hooks_and_info_are_what_the_model_reports(reference_model, shared_model):
    from saelab.models import hook_names

    assert saelab.hooks(grep="hook_resid_post") == [h for h in hook_names(reference_model) if "hook_resid_post" in h]
    got = saelab.info(rows=2, context_size=16)
    cfg = reference_model.cfg
    assert (got.n_layers, got.d_model, got.d_vocab, got.n_ctx) == (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.n_ctx)
    assert got.tokens == 2 * 15 and got.hooks == hook_names(reference_model)
    assert str(got).splitlines()[0].startswith("model      reference: ") and "saelab model" in got._repr_html_()


def test_importing_the_api_leaves_saelab_dashboard_the_function():
    """The subpackage saelab.dashboard, once imported, is bound over the API function `saelab.dashboard`: the API
    module must not import it at load time (its functions import it when called)."""
    import subprocess
    import sys

    code = "import sys, saelab; saelab.steer; print('saelab.dashboard' in sys.modules, callable(saelab.dashboard))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["False", "True"], r.stderr
