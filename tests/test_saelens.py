"""SAELens interop both ways, checked against SAELens itself.

SAELens → saelab: tests/fixtures/saelens/<name>/ are folders written by SAELens 6.54.12 (make_fixtures.py, run in a
separate venv) with SAELens's own reconstruction and feature activations for a batch of inputs; the loader must
reproduce them, with every convention SAELens has and saelab does not folded in. saelab → SAELens: the slow test
loads our folders in SAELens (in its venv, skipped when absent) and compares x̂; the fast tests check the layout.
Broken folders raise `SAEFileError` naming the file that is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab
from saelab.config import SAEConfig
from saelab.errors import SAEFileError
from saelab.sae import SparseAutoencoder
from saelab.sae.sae import load_sae
from saelab.sae.saelens import SAELENS_FORMAT, save_sae

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
FOLDERS = sorted(p for p in FIXTURES.iterdir() if (p / "cfg.json").exists())
TRANSCODERS = [p.name for p in FOLDERS if "d_out" in json.loads((p / "cfg.json").read_text())]
NAMES = [p.name for p in FOLDERS if p.name not in TRANSCODERS]  # SAEs
SAELENS_PYTHON = Path(os.environ.get("SAELENS_PYTHON", "/tmp/saelens-venv/bin/python"))


def expected(name):
    e = json.loads((FIXTURES / name / "expected.json").read_text())
    x, x_hat = torch.tensor(e["x"]), torch.tensor(e["x_hat"])
    a = e["acts"]
    return x, x_hat, (a["rows"], a["cols"], torch.tensor(a["values"]))


def dense_acts(rows_cols_values, shape):
    rows, cols, values = rows_cols_values
    out = torch.zeros(shape)
    out[rows, cols] = values
    return out


def rel_err(a, b):
    return float((a - b).detach().norm() / b.norm())


# ------------------------------------------------------------------------------------------ SAELens → saelab
def test_fixtures_cover_every_convention():
    assert {"topk", "topk_rescale", "topk_trained", "topk_no_b_dec_input", "topk_constant_norm_rescale",
            "topk_layer_norm", "topk_all_conventions", "jumprelu", "standard", "batchtopk", "gated",
            "gated_no_b_dec_input"} <= set(NAMES)
    assert set(TRANSCODERS) == {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
    cfg = json.loads((FIXTURES / "batchtopk" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens saves BatchTopK for inference as JumpReLU
    assert cfg["metadata"]["training_architecture"] == "batchtopk"


@pytest.mark.parametrize("name", NAMES)
def test_loader_reproduces_saelens(name):
    x, x_hat_ref, acts = expected(name)
    sae = load_sae(FIXTURES / name)
    code = sae.encode(x)
    z_ref = dense_acts(acts, (x.shape[0], sae.n_latents))
    z = code.to_dense(sae.n_latents)
    assert torch.equal(z != 0, z_ref != 0), "a different set of active latents than SAELens"
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    x_hat = sae.decode(code).detach()
    assert rel_err(x_hat, x_hat_ref) < 1e-5
    assert float((x_hat - x_hat_ref).abs().max()) < 1e-4
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.model_name == "gpt2"


@pytest.mark.parametrize("name, naive_error", [("topk_rescale", 0.1), ("topk_no_b_dec_input", 0.1),
                                               ("topk_constant_norm_rescale", 0.1), ("topk_layer_norm", 0.01)])
def test_conventions_matter(name, naive_error):
    """Reading the weights as plain saelab TopK (what the loader did before) is far off: the fixtures catch it."""
    x, x_hat_ref, _ = expected(name)
    cfg = json.loads((FIXTURES / name / "cfg.json").read_text())
    w = load_file(str(FIXTURES / name / "sae_weights.safetensors"))
    naive = SparseAutoencoder(SAEConfig(d_in=cfg["d_in"], n_latents=cfg["d_sae"], k=cfg["k"], ln_unbiased=False,
                                        normalize="layer_norm" if name == "topk_layer_norm" else "none"))
    with torch.no_grad():
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(naive, n).copy_(w[n])
    assert rel_err(naive.decode(naive.encode(x)), x_hat_ref) > naive_error
    assert rel_err(load_sae(FIXTURES / name).decode(load_sae(FIXTURES / name).encode(x)), x_hat_ref) < 1e-5


def test_standard_loads_as_relu_and_jumprelu_as_thresholds():
    relu = load_sae(FIXTURES / "standard")
    assert relu.cfg.architecture == "relu" and not hasattr(relu, "threshold")
    assert load_sae(FIXTURES / "gated").cfg.architecture == "gated"
    jump = load_sae(FIXTURES / "jumprelu")
    raw = load_file(str(FIXTURES / "jumprelu" / "sae_weights.safetensors"))["threshold"]
    assert (raw < 0).any(), "the fixture has negative thresholds (SAELens's ReLU zeroes those values)"
    torch.testing.assert_close(jump.arch.threshold(jump).detach(), raw.clamp_min(0), rtol=1e-6, atol=0)  # as 0
    bt = load_sae(FIXTURES / "batchtopk")
    assert bt.cfg.k == 4  # the trained k, from SAELens's training metadata


@pytest.mark.parametrize("name", TRANSCODERS)
def test_loader_reproduces_saelens_transcoders(name, tmp_path):
    """SAELens's transcoder classes load as saelab transcoders of its input and output hooks (ReLU → relu, JumpReLU →
    jumprelu; skip_ → the skip term) and reproduce SAELens's codes, its decode and its output at the target hook
    (forward: the decode plus x·W_skipᵀ); saved again by saelab, the folder is SAELens's class and tensors."""
    e = json.loads((FIXTURES / name / "expected.json").read_text())
    x, y_hat_ref, decoded_ref = (torch.tensor(e[k]) for k in ("x", "y_hat", "decoded"))
    a = e["acts"]
    raw = json.loads((FIXTURES / name / "cfg.json").read_text())
    assert raw["architecture"] == name and e["loaded_as"] in e["saved_by"]  # written and read back by that class
    sae = load_sae(FIXTURES / name)
    skip = "skip" in name
    assert (sae.cfg.architecture, sae.cfg.skip) == ("jumprelu" if name.startswith("jumprelu") else "relu", skip)
    assert sae.cfg.hook_name == "blocks.3.ln2.hook_normalized" and sae.cfg.target_hook == "blocks.3.hook_mlp_out"
    assert (sae.d_in, sae.cfg.d_out, sae.n_latents) == (16, 24, 48) and sae.cfg.model_name == "gpt2"
    code = sae.encode(x)
    z = code.to_dense(48).detach()
    z_ref = dense_acts((a["rows"], a["cols"], torch.tensor(a["values"])), z.shape)
    assert torch.equal(z != 0, z_ref != 0), "a different set of active latents than SAELens"
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    y_hat = sae.decode(code, x).detach()
    assert y_hat.shape == (x.shape[0], 24) and rel_err(y_hat, y_hat_ref) < 1e-5
    w = load_file(str(FIXTURES / name / "sae_weights.safetensors"))
    if skip:  # the skip term is SAELens's forward minus its decode, and large enough that dropping it shows
        torch.testing.assert_close(y_hat - (z @ sae.W_dec + sae.b_dec).detach(), y_hat_ref - decoded_ref,
                                   atol=1e-5, rtol=1e-5)
        assert rel_err(decoded_ref, y_hat_ref) > 0.2
        with pytest.raises(ValueError, match="decode\\(code, x\\)"):
            sae.decode(code)
    else:
        assert torch.equal(y_hat_ref, decoded_ref)
    if "threshold" in w:  # the thresholds count: a ReLU reading of the weights fires other latents
        assert (w["threshold"] < 0).any() and not torch.equal((x @ w["W_enc"] + w["b_enc"] > 0), z_ref != 0)
    save_sae(sae, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again["architecture"] == name and again["d_out"] == 24 and again["apply_b_dec_to_input"] is False
    assert again["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    w2 = load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    assert w2.keys() == w.keys()
    for n in w:  # (SAELens's negative thresholds are saved as 0, which codes the same)
        torch.testing.assert_close(w2[n], w[n].clamp_min(0) if n == "threshold" else w[n], atol=1e-6, rtol=1e-6)


def test_pre_6_layout_loads_the_same(tmp_path):
    """SAELens < 6 wrote a flat cfg.json (hook_point, activation_fn_str, activation_fn_kwargs)."""
    shutil.copytree(FIXTURES / "topk", tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    old = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "torch.float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": None, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": cfg["k"]}, "hook_point": meta["hook_name"], "model_name": meta["model_name"],
           "context_size": 128, "sae_lens_training_version": "3.0.0"}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(old))
    x, x_hat_ref, _ = expected("topk")
    sae = load_sae(tmp_path / "old")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == cfg["k"] and sae.cfg.hook_name == meta["hook_name"]
    assert rel_err(sae.decode(sae.encode(x)), x_hat_ref) < 1e-5


def test_notebook_api_loads_saelens_folders(tmp_path):
    x, x_hat_ref, _ = expected("topk")
    sae = saelab.load_sae(str(FIXTURES / "topk"))  # a folder SAELens saved: its reconstruction, reproduced
    assert rel_err(sae.decode(sae.encode(x)), x_hat_ref) < 1e-5
    import shutil

    shutil.copytree(FIXTURES / "topk", tmp_path / "run" / "sae")  # a run directory holding it loads the same
    again = saelab.load_sae(tmp_path / "run")
    assert torch.equal(again.W_dec, sae.W_dec) and saelab.Run(tmp_path / "run").sae.cfg.k == sae.cfg.k


# ------------------------------------------------------------------------------------------ saelab → SAELens
def make(arch="topk", normalize="scale", seed=0, d=24, n=96, k=5, **kw):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(architecture=arch, d_in=d, n_latents=n, k=k, normalize=normalize,
                                      hook_name="blocks.1.hook_resid_pre", model_name="reference", **kw))
    sae.reset_parameters(seed=seed)
    x = torch.randn(256, d) * 3 + 1
    sae.init_from_data_(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if not sae.arch.unit_decoder:  # free decoder norms (ReLU, Gated): every norm matters
            sae.W_dec.mul_(torch.rand(n, 1) * 1.5 + 0.5)
        if hasattr(sae, "r_mag"):  # Gated's magnitude path differs from its gate path
            sae.r_mag.normal_(0, 0.4)
            sae.b_mag.normal_(0, 0.2)
        if hasattr(sae, "threshold"):  # a learned threshold (BatchTopK, Matryoshka): mean L0 ≈ k, between two
            pre = sae.preacts(sae.normalize_input(x)[0]).flatten().sort().values  # values, not at a tie
            i = pre.numel() - x.shape[0] * k
            sae.threshold.fill_(float(pre[i - 1] + pre[i]) / 2)
    return sae, x


OURS = [("topk", "scale"), ("topk", "none"), ("topk", "layer_norm"), ("topk", "constant_norm_rescale"),
        ("batchtopk", "scale"), ("matryoshka", "scale"), ("gtopk", "scale"), ("relu", "scale"),
        ("relu", "layer_norm"), ("gated", "scale"), ("gated", "none")]


@pytest.mark.parametrize("arch, normalize", OURS)
def test_round_trip(tmp_path, arch, normalize):
    sae, x = make(arch, normalize)
    before = sae.decode(sae.encode(x))
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.architecture == arch and loaded.cfg.options == sae.cfg.options
    after = loaded.decode(loaded.encode(x))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(loaded.encode(x).to_dense(96) != 0, sae.encode(x).to_dense(96) != 0)
    # the loaded SAE works on raw activations, so its FVU denominator is in raw units: the same FVU
    s = sae.cfg.input_scale if normalize == "scale" else 1.0
    torch.testing.assert_close(loaded.loss_normalizer, sae.loss_normalizer / s ** 2)
    if loaded.arch.trainable:
        torch.testing.assert_close(loaded(x).losses["fvu"], sae(x).losses["fvu"], rtol=1e-4, atol=1e-6)
    assert not list((tmp_path / "sae").glob(".*tmp"))  # no temporary file left


def test_folder_saved_before_the_architecture_seam_loads(tmp_path):
    """saelab.json format 1 (saelab 0.1.0's runs): TopK's flags top-level, layer norm biased, no options."""
    sae, x = make("topk", "layer_norm", options={"multi_topk": True})
    sae.cfg.ln_unbiased = False  # saelab 0.1.0's layer norm: the biased σ
    save_sae(sae, tmp_path / "sae")
    info = json.loads((tmp_path / "sae" / "saelab.json").read_text())
    old = {k: v for k, v in info["sae"].items() if k not in ("options", "ln_eps", "ln_unbiased")}
    old.update(relu_before_topk=False, multi_topk=True)
    (tmp_path / "sae" / "saelab.json").write_text(json.dumps({"format": 1, "sae": old}))
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.options == {"relu_before_topk": False, "multi_topk": True}
    assert (loaded.cfg.ln_unbiased, loaded.cfg.ln_eps) == (False, 1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), atol=1e-4, rtol=1e-4)


def test_cfg_json_has_what_saelens_reads(tmp_path):
    sae, _ = make("batchtopk")
    save_sae(sae, tmp_path / "sae", extra={"train_config": {"context_size": 64, "corpus": {"source": "stdlib"}}})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAE.load_from_disk: a 6.x version keeps `metadata` as it is (else it is rebuilt from top-level keys)
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 24 and cfg["d_sae"] == 96
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6 and meta["sae_lens_version"] == SAELENS_FORMAT
    # ActivationsStore.from_sae needs hook_name, context_size and prepend_bos; it also reads hook_head_index and
    # seqpos_slice; the training runner records dataset_path, model_class_name, model_from_pretrained_kwargs
    assert meta["hook_name"] == "blocks.1.hook_resid_pre" and meta["model_name"] == "reference"
    assert meta["context_size"] == 64 and meta["prepend_bos"] is True and meta["dataset_path"] == "stdlib"
    for key in ("hook_head_index", "seqpos_slice", "model_class_name", "model_from_pretrained_kwargs",
                "exclude_special_tokens", "sae_lens_training_version"):
        assert key in meta
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}  # exactly JumpReLUSAE's state
    assert weights["W_enc"].shape == (24, 96) and weights["threshold"].shape == (96,)


def test_the_runs_fields_come_from_the_caller(tmp_path):
    """The SAE knows its model and hook; its hook's layer, context size and dataset are its run's: null in a bare
    save, the run's when the trainer (or calibrate) passes them."""
    from saelab.config import CorpusSpec, TrainConfig
    from saelab.training.trainer import saelens_run_metadata

    def run_fields(folder):
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        return meta["hook_layer"], meta["context_size"], meta["dataset_path"]

    sae, _ = make("topk")
    save_sae(sae, tmp_path / "bare")
    assert run_fields(tmp_path / "bare") == (None, None, None)
    cfg = TrainConfig(context_size=48, corpus=CorpusSpec(source="NeelNanda/pile-10k"))
    sae.save(tmp_path / "run", metadata=saelens_run_metadata(cfg, sae))
    assert run_fields(tmp_path / "run") == (1, 48, "NeelNanda/pile-10k")  # blocks.1.hook_resid_pre
    sae.save(tmp_path / "no-config", metadata=saelens_run_metadata(None, sae))
    assert run_fields(tmp_path / "no-config") == (1, None, None)


# ------------------------------------------------------------------------------------------ broken folders
@pytest.fixture
def folder(tmp_path):
    sae, _ = make("topk", "scale")
    return save_sae(sae, tmp_path / "sae")


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(data))


def test_truncated_weights(folder):
    w = folder / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: not a readable safetensors file") as e:
        load_sae(folder)
    assert "truncated" in e.value.hint


@pytest.mark.parametrize("name", ["cfg.json", "saelab.json"])
def test_json_that_is_not_json(folder, name):
    (folder / name).write_text('{"d_in": 24, "d_sae": ')
    with pytest.raises(SAEFileError, match=rf"{name}: not valid JSON \(line 1"):
        load_sae(folder)


def test_missing_cfg_json_and_missing_weights(folder):
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEFileError, match="cfg.json: missing"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()
    (folder / "sae.pt").write_bytes(b"never unpickled")
    with pytest.raises(SAEFileError, match="no sae_weights.safetensors") as e:
        load_sae(folder)
    assert "pickle" in e.value.hint


@pytest.mark.parametrize("key, value, field", [("d_sae", 128, "d_sae"), ("k", 7, "k"),
                                               ("architecture", "jumprelu", "architecture"),
                                               ("normalize_activations", "layer_norm", "normalize_activations"),
                                               ("metadata.hook_name", "blocks.0.hook_resid_pre", "hook_name")])
def test_cfg_json_disagreeing_with_saelab_json(folder, key, value, field):
    edit_json(folder / "cfg.json", **{key: value})
    with pytest.raises(SAEFileError, match=rf"cfg.json and saelab.json disagree: .*{field}"):
        load_sae(folder)


def test_both_configs_disagreeing_with_the_weights(folder, tmp_path):
    other, _ = make("topk", "scale", d=32)
    save_sae(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "sae_weights.safetensors", folder / "sae_weights.safetensors")
    with pytest.raises(SAEFileError, match=r"sae_weights.safetensors: W_enc is \(32, 96\) but the config says "
                                           r"\(24, 96\)"):
        load_sae(folder)


def test_saelens_cfg_disagreeing_with_its_weights(tmp_path):
    shutil.copytree(FIXTURES / "topk", tmp_path / "s")
    edit_json(tmp_path / "s" / "cfg.json", d_sae=32)
    with pytest.raises(SAEFileError, match=r"sae_weights.safetensors: W_enc is \(16, 64\) but the config says"):
        load_sae(tmp_path / "s")


@pytest.mark.parametrize("tensor, value", [("W_dec", float("nan")), ("b_enc", float("inf"))])
def test_non_finite_weights(folder, tensor, value):
    w = load_file(str(folder / "sae_weights.safetensors"))
    w[tensor][3] = value
    save_file(w, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFileError, match=rf"sae_weights.safetensors: {tensor} has \d+ non-finite"):
        load_sae(folder)


def test_unexpected_or_missing_tensor(folder):
    w = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**w, "threshold": torch.zeros(96)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFileError, match=r"unexpected \['threshold'\]"):
        load_sae(folder)
    del w["b_dec"]
    save_file(w, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFileError, match=r"missing \['b_dec'\]"):
        load_sae(folder)


@pytest.mark.parametrize("key, value, message", [
    ("architecture", "temporal", "architecture 'temporal' cannot be loaded"),
    ("architecture", "matching_pursuit", "architecture 'matching_pursuit' cannot be loaded"),
    ("normalize_activations", "expected_average_only_in", "never folded"),
    ("normalize_activations", "covariance_whitening", "never folded"),
    ("k", 65, r"integer k in \[1, d_sae=64\], got 65"),
])
def test_refuses_what_it_cannot_reproduce(tmp_path, key, value, message):
    shutil.copytree(FIXTURES / "topk", tmp_path / "s")
    edit_json(tmp_path / "s" / "cfg.json", **{key: value})
    with pytest.raises(SAEFileError, match=message):
        load_sae(tmp_path / "s")


@pytest.mark.parametrize("fixture, edits, message, hint", [
    # a transcoder's folder labelled as an SAE: its decoder writes another width
    ("transcoder", {"architecture": "standard"}, r"W_dec is \(48, 24\): its output is 24 wide, not d_in 16, so "
                                                 r"these are a transcoder's weights", "d_out 24"),
    ("skip_transcoder", {"architecture": "transcoder"}, r"unexpected \['W_skip'\] for a relu transcoder",
     "'skip_transcoder'"),
    ("transcoder", {"architecture": "skip_transcoder"}, r"missing \['W_skip'\] for a relu skip-transcoder",
     "'skip_transcoder'"),
    # an SAE's folder labelled as a transcoder: its b_dec centres the input, which SAELens's transcoders refuse
    ("standard", {"architecture": "transcoder", "d_out": 16}, "a 'transcoder' with apply_b_dec_to_input=true",
     "apply_b_dec_to_input false"),
    ("standard", {"architecture": "transcoder"}, "d_out must be a positive integer, got None", ""),
    ("jumprelu_transcoder", {"architecture": "transcoder"}, "a 'transcoder' \\(ReLU\\) has no threshold", ""),
    ("transcoder", {"d_out": 16}, r"W_dec is \(48, 24\) but the config says \(48, 16\) .*d_out 16", ""),
    ("transcoder", {"architecture": "topk_transcoder", "k": 4}, "architecture 'topk_transcoder' cannot be loaded",
     "'jumprelu_skip_transcoder'"),
])
def test_transcoder_and_sae_folders_mislabelled(tmp_path, fixture, edits, message, hint):
    """A transcoder's weights under an SAE's cfg.json, or the reverse, is refused with what is wrong."""
    shutil.copytree(FIXTURES / fixture, tmp_path / "s")
    edit_json(tmp_path / "s" / "cfg.json", **edits)
    with pytest.raises(SAEFileError, match=message) as e:
        load_sae(tmp_path / "s")
    assert hint in e.value.hint


def test_not_a_folder(tmp_path):
    with pytest.raises(SAEFileError, match="no such folder"):
        load_sae(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ SAELens itself
@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason=f"no SAELens venv at {SAELENS_PYTHON} (see "
                                                         f"tests/fixtures/saelens/make_fixtures.py; SAELENS_PYTHON)")
def test_saelens_loads_our_folders(tmp_path):
    """SAELens's `SAE.load_from_disk` loads each of our folders, keeps our metadata, reproduces x̂ and the
    feature activations, and `ActivationsStore.from_sae` builds a store from the folder's metadata."""
    cases = OURS + [("jumprelu", None)]
    ours = {}
    for i, (arch, normalize) in enumerate(cases):
        if arch == "jumprelu":  # an imported SAELens JumpReLU SAE, re-saved by saelab
            sae, x = load_sae(FIXTURES / "jumprelu"), expected("jumprelu")[0]
        else:
            sae, x = make(arch, normalize, seed=i, ln_unbiased=normalize == "layer_norm")
            x = x[:64]
        name = f"{arch}-{normalize}"
        save_sae(sae, tmp_path / name, extra={"train_config": {"context_size": 32, "corpus": {"source": "stdlib"}}})
        code = sae.encode(x)
        ours[name] = (x, sae.decode(code).detach(), code.to_dense(sae.n_latents))
        (tmp_path / name / "x.json").write_text(json.dumps(x.tolist()))
    script = FIXTURES / "check_in_saelens.py"
    proc = subprocess.run([str(SAELENS_PYTHON), str(script), str(tmp_path), *ours], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "saelens_report.json").read_text())
    for name, (x, x_hat, z) in ours.items():
        r = report[name]
        diff = float((torch.tensor(r["x_hat"]) - x_hat.detach()).abs().max())
        print(f"{name}: SAELens {r['class']}, max |x_hat diff| {diff:.2e}")
        assert diff < 1e-5 * max(1.0, float(x_hat.abs().max())), name
        assert torch.equal(torch.tensor(r["acts"]) != 0, z != 0), name
        hook = json.loads((tmp_path / name / "cfg.json").read_text())["metadata"]["hook_name"]
        assert r["metadata"]["hook_name"] == hook and r["metadata"]["context_size"] == 32, name
        assert r["metadata"]["saelab_version"] == saelab.__version__  # our metadata survives SAELens's loader
        assert r["store"]["hook_name"] == hook and r["store"]["context_size"] == 32 and r["store"]["prepend_bos"]
        assert r["store"]["activations_shape"][-1] == x.shape[1], name


# transcoders saelab trains → the SAELens class that loads each (jumprelu and the BatchTopK family: JumpReLU at
# inference)
TRAINED_TRANSCODERS = {("relu", False): "Transcoder", ("relu", True): "SkipTranscoder",
                       ("jumprelu", False): "JumpReLUTranscoder", ("batchtopk", False): "JumpReLUTranscoder",
                       ("batchtopk", True): "JumpReLUSkipTranscoder"}


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason=f"no SAELens venv at {SAELENS_PYTHON} (see "
                                                         f"tests/fixtures/saelens/make_fixtures.py; SAELENS_PYTHON)")
def test_saelens_loads_the_transcoders_we_train(tmp_path):
    """Tiny transcoders trained by saelab (one pass, `train_many`) on an MLP's input → output (d_in 16, d_out 24) and
    saved: SAELens loads each as its transcoder class, keeps both hooks and d_out, and reproduces our codes and our
    output at the target hook (its forward, the skip term included); a TopK transcoder, saved as topk_transcoder,
    is refused by SAELens by name rather than read as something else."""
    from saelab.activations.in_memory import InMemoryActivations
    from saelab.config import TrainConfig
    from saelab.training.trainer import train_many

    hook_in, hook_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"  # both hooks exist in TransformerLens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) * 2 + 0.5
    A, B = torch.randn(16, 64, generator=g) / 4, torch.randn(64, 24, generator=g) / 8
    y = torch.relu(x @ A - 0.5) @ B + 0.3  # an MLP: the target is another width, a nonlinear function of the input
    cases = [*TRAINED_TRANSCODERS, ("topk", False)]
    cfgs = [TrainConfig(sae=SAEConfig(architecture=arch, n_latents=64, k=4, hook_name=hook_in, target_hook=hook_out,
                                      skip=skip, model_name="reference",
                                      # (from the default start, 40 steps against a random decoder raise the
                                      # thresholds until few latents fire; a low start keeps many of them in play)
                                      options={"init_threshold": 0.1} if arch == "jumprelu" else {}),
                        context_size=32, tokens=256 * 40,
                        batch_size=256, lr=3e-3, lr_warmup_steps=5, log_every=10, checkpoint_every=1000,
                        eval_tokens=0) for arch, skip in cases]
    names = [f"{arch}{'-skip' if skip else ''}" for arch, skip in cases]
    results = train_many(cfgs, [tmp_path / n for n in names], InMemoryActivations(x, 256, seed=0, targets=y),
                         progress=False)
    xs = x[:64]
    ours = {}
    for name, res in zip(names, results):
        folder = tmp_path / name / "sae"
        sae = load_sae(folder)
        code = sae.encode(xs)
        ours[name] = (sae.decode(code, xs).detach(), code.to_dense(sae.n_latents))
        torch.testing.assert_close(ours[name][0], res.sae.decode(res.sae.encode(xs), xs).detach(), atol=1e-4,
                                   rtol=1e-4)  # the folder computes what training left
        assert float(ours[name][1].ne(0).float().sum(-1).mean()) > 2, name  # the codes are not silent
        (folder / "x.json").write_text(json.dumps(xs.tolist()))
    *loadable, topk = names
    proc = subprocess.run([str(SAELENS_PYTHON), str(FIXTURES / "check_in_saelens.py"), str(tmp_path),
                           *(f"{n}/sae" for n in loadable)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "saelens_report.json").read_text())
    for (arch, skip), name in zip(TRAINED_TRANSCODERS, loadable):
        r, (y_hat, z) = report[f"{name}/sae"], ours[name]
        diff = float((torch.tensor(r["forward"]) - y_hat).abs().max())
        print(f"{name}: SAELens {r['class']}, max |y_hat diff| {diff:.2e}, L0 {(z != 0).float().sum(-1).mean():.1f}")
        assert r["class"] == TRAINED_TRANSCODERS[arch, skip], name
        assert diff < 1e-5 * max(1.0, float(y_hat.abs().max())), name
        assert torch.equal(torch.tensor(r["acts"]) != 0, z != 0), name
        torch.testing.assert_close(torch.tensor(r["acts"]), z, atol=1e-5, rtol=1e-5)
        assert (r["metadata"]["hook_name"], r["metadata"]["hook_name_out"]) == (hook_in, hook_out), name
        assert r["store"]["hook_name"] == hook_in and r["store"]["activations_shape"][-1] == 16, name
        if skip:  # SAELens's decode leaves the skip term out; its forward adds it
            assert not torch.allclose(torch.tensor(r["x_hat"]), y_hat, atol=1e-3), name
    assert json.loads((tmp_path / topk / "sae" / "cfg.json").read_text())["architecture"] == "topk_transcoder"
    refused = subprocess.run([str(SAELENS_PYTHON), "-c", "import sys; from sae_lens import SAE; "
                              "SAE.load_from_disk(sys.argv[1])", str(tmp_path / topk / "sae")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "topk_transcoder" in refused.stderr, refused.stderr[-2000:]
