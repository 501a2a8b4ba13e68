"""Any model family from a local folder: tiny random GPT-2, GPT-NeoX, Llama, Gemma-2, Qwen-2 and Mistral models
(tests/tiny_models.py) through every command, each result checked against the same model run by plain transformers.

Fast: a folder named like a TransformerLens alias (`pythia-70m`) loads as itself with the hub out of reach, and the
cache, run and SAE record it by its absolute path, which later commands load from any directory.
Slow (one family per parameter): a cache of every hook family the docs name, an SAE on each with the closing core
evaluation, probing, dashboard, steering, patching and the explorer's prompt view.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import run_cli  # noqa: E402
from tiny_models import FAMILIES, N_LAYERS, build_family, hf_layers, hf_model  # noqa: E402

T = 32  # tokens per row of every cache and pass here
MIDDLE = "blocks.1.hook_resid_pre"  # the default hook of a 2-layer model
HOOKS = [MIDDLE] + [f"blocks.0.{kind}" for kind in ("hook_resid_mid", "hook_resid_post", "hook_attn_out",
                                                    "hook_mlp_out", "attn.hook_z")]
PARALLEL = {"pythia-70m"}  # GPT-NeoX: attention and MLP read the same stream, so there is no resid_mid


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """folders(name) → the family's model folder, built on first use (all under one root)."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, root)
        return built[name]

    return get


@pytest.fixture
def offline(monkeypatch):
    """No hub: a name sent there fails instead of downloading (HF_HUB_OFFLINE as transformers reads it)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("saelab.hub.hub_reachable", lambda *a, **k: False)


def bos_and(tokenizer, text: str) -> list[int]:
    from saelab.data.packing import special_ids

    return [special_ids(tokenizer)[0]] + tokenizer(text, add_special_tokens=False)["input_ids"]


# ================================================================================================ fast
def test_a_folder_named_like_an_alias_loads_itself(folders, offline, monkeypatch, capsys):
    """`./pythia-70m` used to reach TransformerLens as the bare name `pythia-70m`, its alias of the hub's
    EleutherAI/pythia-70m (6 layers): offline that failed, online it loaded the hub model instead."""
    from saelab.errors import ModelError
    from saelab.models import check_hook_names, load_model

    folder = folders("pythia-70m")
    monkeypatch.chdir(folder.parent)
    for name in ("./pythia-70m", "pythia-70m"):
        code, out, err = run_cli(capsys, "hooks", "--model", name, "--grep", "resid")
        assert code == 0, err
        # the folder's 2 layers, and no resid_mid: GPT-NeoX runs attention and MLP in parallel
        assert out.split() == [f"blocks.{i}.hook_resid_{w}" for i in range(N_LAYERS) for w in ("post", "pre")]
    model = load_model("pythia-70m")
    assert model.saelab_model_id == model.saelab_model_source == str(folder.resolve())
    # rotary: no position embedding in the residual stream, though TransformerLens lists hook_pos_embed
    with pytest.raises(ModelError, match="'hook_pos_embed' is listed by TransformerLens but carries no activation"):
        check_hook_names(model, "hook_pos_embed")
    tokens = torch.tensor([bos_and(model.tokenizer, "def f(x):\n    return x")])
    with torch.no_grad():  # its own weights: plain transformers on the folder gives the same logits
        torch.testing.assert_close(model(tokens), hf_model(folder)(tokens).logits, rtol=0, atol=1e-5)


def test_runs_record_the_folder_by_its_absolute_path(folders, offline, tmp_path, monkeypatch, capsys):
    """The cache manifest, the run's config and the SAE name the folder by its absolute path, so `eval` from
    another directory loads the same folder (a bare `pythia-70m` there would be the hub's model)."""
    folder = folders("pythia-70m")
    where = str(folder.resolve())
    monkeypatch.chdir(folder.parent)
    code, _, err = run_cli(capsys, "cache", "--model", "pythia-70m", "--hooks", MIDDLE, "--tokens", str(8 * T),
                           "--context-size", str(T), "--out", str(tmp_path / "cache"), "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["spec"]["model"]["name"] == manifest["model"] == manifest["model_source"] == where
    monkeypatch.chdir(tmp_path)  # where `pythia-70m` is no folder
    code, _, err = run_cli(capsys, "train", "--cache", "cache", "--tokens", str(4 * T), "--batch-size", "64",
                           "--n-latents", "32", "--k", "4", "--eval-tokens", "0", "--out", "run", "--no-progress")
    assert code == 0, err
    sae_cfg = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert sae_cfg["model_name"] == sae_cfg["metadata"]["model_name"] == where
    assert f"name: {where}" in (tmp_path / "run" / "config.yaml").read_text()
    code, out, err = run_cli(capsys, "eval", "run", "--tokens", str(4 * T))
    assert code == 0, err
    assert "CE clean" in out


# ================================================================================================ slow
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, folders, tmp_path_factory):
    """(name, folder, cache, {hook: run}): a cache of every hook the family has (the middle residual stream and
    layer 0's resid mid/post, attention and MLP outputs, attention hook_z) and one SAE per hook trained from it
    with the closing core evaluation."""
    from saelab.cli import main

    name = request.param
    folder = folders(name)
    root = tmp_path_factory.mktemp(name)
    hooks = [h for h in HOOKS if not (name in PARALLEL and h.endswith("resid_mid"))]
    assert main(["cache", "--model", str(folder), "--hooks", ",".join(hooks), "--tokens", str(64 * T),
                 "--context-size", str(T), "--out", str(root / "cache"), "--no-progress"]) == 0
    runs = {}
    for hook in hooks:
        runs[hook] = root / hook
        assert main(["train", "--cache", str(root / "cache"), "--hook", hook, "--tokens", str(64 * T),
                     "--batch-size", "256", "--n-latents", "64", "--k", "4", "--eval-tokens", str(8 * T),
                     "--out", str(runs[hook]), "--no-progress"]) == 0
    return name, folder, root / "cache", runs


@pytest.fixture(scope="module")
def bundle(family):
    """The dashboard of the middle-stream SAE, built by `saelab dashboard`."""
    import saelab.dashboard as dash
    from saelab.cli import main

    _, _, _, runs = family
    assert main(["dashboard", str(runs[MIDDLE]), "--tokens", str(64 * T), "--context-size", str(T),
                 "--no-progress"]) == 0
    return dash.open(runs[MIDDLE] / "dashboard")


def cached(cache: Path, hook: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((cache / hook).glob("acts-*.npy"))])


@pytest.mark.slow
def test_cached_hooks_are_the_transformers_hidden_states(family):
    """The middle stream equals transformers' hidden state 1 on the cached rows (BOS dropped), and layer 0's hooks
    add up as the family's block does: resid_mid = stream + attn_out, resid_post = resid_mid + mlp_out (parallel
    blocks: stream + attn_out + mlp_out), resid_post of block 0 = resid_pre of block 1."""
    name, folder, cache, _ = family
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["spec"]["model"]["name"] == str(folder.resolve())
    tokens = torch.from_numpy(np.concatenate([np.load(p) for p in sorted(cache.glob("tokens-*.npy"))])).long()
    with torch.no_grad():
        hidden = hf_model(folder)(tokens, output_hidden_states=True).hidden_states
    stream0 = hidden[0][:, 1:].reshape(-1, hidden[0].shape[-1]).numpy()
    want = hidden[1][:, 1:].reshape(-1, hidden[1].shape[-1]).numpy()
    got = {h: cached(cache, h) for h in manifest["hooks"]}
    atol = 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got[MIDDLE], want, rtol=0, atol=atol)
    np.testing.assert_array_equal(got["blocks.0.hook_resid_post"], got[MIDDLE])
    attn, mlp = got["blocks.0.hook_attn_out"], got["blocks.0.hook_mlp_out"]
    if name in PARALLEL:
        assert "blocks.0.hook_resid_mid" not in got
        np.testing.assert_allclose(stream0 + attn + mlp, got[MIDDLE], rtol=0, atol=atol)
    else:
        np.testing.assert_allclose(stream0 + attn, got["blocks.0.hook_resid_mid"], rtol=0, atol=atol)
        np.testing.assert_allclose(got["blocks.0.hook_resid_mid"] + mlp, got[MIDDLE], rtol=0, atol=atol)
    heads = manifest["spec"]["d_in"]["blocks.0.attn.hook_z"]
    assert heads == 64  # hook_z [pos, heads, d_head] flattened: 4 heads × 16


@pytest.mark.slow
def test_every_listed_hook_fires(family):
    """`saelab hooks` lists what a forward pass reaches in this family, nothing TransformerLens merely names."""
    from saelab.models import hook_names, load_model

    _, folder, _, _ = family
    model = load_model(str(folder))
    names = hook_names(model)
    assert set(HOOKS) - {"blocks.0.hook_resid_mid"} <= set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.zeros(1, 4, dtype=torch.long), names_filter=names)
    got = set(cache.cache_dict)
    assert not [n for n in names if n not in got and model.hook_dict[n].name not in got]


@pytest.mark.slow
def test_every_hook_trains_with_its_core_evaluation(family):
    name, folder, _, runs = family
    for hook, run in runs.items():
        cfg = json.loads((run / "sae" / "cfg.json").read_text())
        assert cfg["hook_name"] == hook and cfg["model_name"] == str(folder.resolve())
        core = json.loads((run / "eval" / "core.json").read_text())
        assert core["hook_name"] == hook
        for key in ("explained_variance", "ce_clean", "ce_sae", "ce_zero_ablation", "kl_sae"):
            assert math.isfinite(core[key]), (hook, key, core[key])
        # a random model predicts about uniformly over the 8192 tokens, whatever its family
        assert abs(core["ce_clean"] - math.log(8192)) < 0.5, (hook, core["ce_clean"])
        # the splice reaches the model: zeroing the hook changes the loss
        assert core["ce_zero_ablation"] != core["ce_clean"], hook


@pytest.mark.slow
def test_probing(family, capsys):
    _, _, _, runs = family
    code, _, err = run_cli(capsys, "eval", str(runs[MIDDLE]), "--suite", "probing", "--tokens", "4k")
    assert code == 0, err
    res = json.loads((runs[MIDDLE] / "eval" / "probing.json").read_text())
    assert res["hook_name"] == MIDDLE and len(res["tasks"]) >= 12
    # the stream holds the tokens (a random model still adds their embeddings): a dense probe reads them
    assert res["mean"]["dense"]["accuracy"] > 0.6, res["mean"]["dense"]


@pytest.mark.slow
def test_dashboard_matches_transformers(family, bundle):
    """A latent's examples are the SAE applied to transformers' hidden states of their rows; its logit lens is the
    folder's own final norm and unembedding (Gemma: RMSNorm's 1 + w) applied to its decoder direction."""
    from saelab.sae import SparseAutoencoder

    _, folder, _, runs = family
    sae = SparseAutoencoder.load(runs[MIDDLE] / "sae")
    hf = hf_model(folder)
    t = bundle.table()
    latent = int(t[(~t["dead"]) & (t["n_rows"] >= 2)].index[0])
    lat = bundle.latent(latent)
    ex = lat.top[0]
    with torch.no_grad():
        hidden = hf(torch.tensor(ex.tokens, dtype=torch.long)[None], output_hidden_states=True).hidden_states[1][0, 1:]
        dense = sae.encode(hidden).to_dense(sae.cfg.n_latents)[:, latent].numpy()
    np.testing.assert_allclose(ex.acts[1:], dense, rtol=1e-4, atol=1e-5 * max(1.0, float(dense.max())))
    _, norm = hf_layers(hf)
    d = sae.decoder_rows().float()[latent][None]
    with torch.no_grad():  # the lens drops the norm's bias (LayerNorm) and its 1/σ, the same for every latent
        effect = hf.get_output_embeddings()(norm(d) - norm(torch.zeros_like(d)))[0]
    want = effect.topk(len(lat.logits_top)).indices.tolist()
    assert [e.token for e in lat.logits_top] == want


@pytest.mark.slow
def test_steer_matches_transformers(family, capsys):
    """`saelab steer` (greedy) equals greedy decoding of plain transformers with α × the position's largest latent
    activation × the decoder direction added to block 1's input at every position (rotary: recomputed each step)."""
    from transformers import AutoTokenizer

    from saelab.eval.steering import steer_directions
    from saelab.sae import SparseAutoencoder

    _, folder, _, runs = family
    sae = SparseAutoencoder.load(runs[MIDDLE] / "sae")
    hf, tok = hf_model(folder), AutoTokenizer.from_pretrained(folder)
    latent, alpha, n_new, prompt = 0, 50.0, 6, "def f("
    code, out, err = run_cli(capsys, "steer", str(runs[MIDDLE]), "--latent", str(latent), "--alpha", str(alpha),
                             "--prompt", prompt, "--max-new-tokens", str(n_new), "--temperature", "0")
    assert code == 0, err
    text = out.split("--- unsteered ---\n", 1)[1]
    plain_text, steered_text = text.split("\n--- steered ---\n")
    direction = steer_directions(sae, [latent], [alpha])[0]

    def add(hidden):
        scale = sae.encode(hidden.reshape(-1, hidden.shape[-1])).values.amax(1).clamp_min(0)
        return hidden + scale.reshape(*hidden.shape[:2], 1) * direction

    def pre_hook(module, args, kwargs):
        if args:
            return (add(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}

    def greedy(steered: bool) -> str:
        ids = torch.tensor([bos_and(tok, prompt)])
        handle = hf_layers(hf)[0][1].register_forward_pre_hook(pre_hook, with_kwargs=True) if steered else None
        try:
            with torch.no_grad():
                for _ in range(n_new):
                    nxt = hf(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], 1)
        finally:
            if handle is not None:
                handle.remove()
        return tok.decode(ids[0, -n_new:].tolist())

    want_plain, want_steered = greedy(False), greedy(True)
    assert want_steered != want_plain  # the strength changes the text, so the comparison below can fail
    assert (plain_text, steered_text.rstrip("\n")) == (want_plain, want_steered)


@pytest.mark.slow
def test_patch_restores_the_differing_token(family, capsys):
    """Activation patching at block 0's input (the embeddings) restores the clean answer exactly at the one
    position where clean and corrupted prompts differ, and changes nothing anywhere else; the family's SAE is
    accepted as the model's."""
    _, folder, _, runs = family
    code, _, err = run_cli(capsys, "patch", "--model", str(folder), "--task", "bracket", "--pairs", "4",
                           "--method", "activation,attribution", "--sae", str(runs[MIDDLE]), "--no-progress")
    assert code == 0, err
    res = json.loads((runs[MIDDLE] / "eval" / "patching" / "patching-bracket.json").read_text())
    layer0 = np.asarray(res["effects"]["activation"]["resid"][0], dtype=float)
    hit = int(np.argmax(np.abs(layer0)))
    np.testing.assert_allclose(layer0[hit], 1.0, atol=1e-3)
    np.testing.assert_allclose(np.delete(layer0, hit), 0.0, atol=1e-3)
    assert res["sae"]["hooks"] == [MIDDLE]


@pytest.mark.slow
def test_prompt_view_matches_transformers(family, bundle, monkeypatch):
    """The explorer's prompt view lists, at a chosen token, the SAE's code of transformers' hidden state there."""
    streamlit_testing = pytest.importorskip("streamlit.testing.v1")
    from saelab.sae import SparseAutoencoder

    app = Path(__file__).resolve().parents[1] / "saelab" / "explorer" / "app"
    _, folder, _, runs = family
    monkeypatch.setenv("SAELAB_EXPLORE", json.dumps([str(runs[MIDDLE])]))
    from saelab.explorer import state

    state.discover.clear()
    text = "def f(x):\n    return x + 1\n"
    at = streamlit_testing.AppTest.from_file(str(app / "explore.py"), default_timeout=180)
    at.run()
    at.query_params["text"], at.query_params["pos"] = text, "2"
    at.switch_page("views/prompt.py")
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    sae = SparseAutoencoder.load(runs[MIDDLE] / "sae")
    from transformers import AutoTokenizer

    ids = bos_and(AutoTokenizer.from_pretrained(folder), text)
    with torch.no_grad():
        hidden = hf_model(folder)(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, 1:]
        code = sae.encode(hidden)
    want = {int(j): float(v) for j, v in zip(code.indices[2], code.values[2]) if v != 0}
    got = at.dataframe[0].value
    assert dict(zip(got["latent"].astype(int), got["value"])) == pytest.approx(want, rel=1e-4, abs=1e-6)
