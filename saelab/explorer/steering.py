"""Steering: pick latents and strengths, steered vs unsteered generations side by side, a strength sweep.

It uses the steering evaluator (`saelab.eval.steering`: a hook adding α·W_dec[f] where the decoder writes, the
SAE's hook or a transcoder's target hook, during generation: `Steer`, `steer_directions`, `generate`), with amounts
α × the latent's max activation as the evaluator uses. Without that module, or without the model, the page says so and the rest of the explorer is unaffected.
"""

from __future__ import annotations

import importlib

import numpy as np
import streamlit as st

from saelab.errors import SaelabError
from saelab.explorer import render, state

NEEDED = ("Steer", "steer_directions", "generate", "prompt_tokens", "lens_tokens")  # used from saelab.eval.steering
SWEEP = (-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0)


def evaluator():
    """The steering module when it is installed and has what the page needs, else None."""
    try:
        mod = importlib.import_module("saelab.eval.steering")
    except ImportError:
        return None
    return mod if all(hasattr(mod, n) for n in NEEDED) else None


def parse_latents(text: str, n: int) -> list[int]:
    """"12, 40" → [12, 40]; SaelabError naming the bad entry."""
    from saelab.errors import ConfigError

    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if not part.lstrip("-").isdigit() or not 0 <= int(part) < n:
            raise ConfigError(f"latent {part!r} is not a latent id: this SAE has latents 0..{n - 1}",
                              hint="give comma-separated ids, e.g. 12,40")
        out.append(int(part))
    return out


def _amounts(bundle, latents: list[int], alpha: float):
    """α × each latent's largest activation in the bundle (1 for a dead latent): the evaluator's convention; its
    largest |activation| for signed codes (a latent that only goes negative has its scale there: α < 0 follows it)."""
    t = bundle.table()
    mx = np.fmax(t["max"].to_numpy(), -t["min"].to_numpy())[latents]
    return [alpha * (float(m) if np.isfinite(m) and m > 0 else 1.0) for m in mx]


@st.cache_data(show_spinner="Generating…", max_entries=64)
def _generate(model_name: str, sae_path: str, bundle_path: str, latents: tuple, alpha: float, prompt: str,
              n_new: int, temperature: float, seed: int, sweep: bool):
    mod = evaluator()
    model, sae, bundle = state.load_model(model_name), state.load_sae(sae_path), state.open_bundle(bundle_path)
    tokens = mod.prompt_tokens(model, prompt)
    P = tokens.shape[1]

    def run(a):
        d = mod.steer_directions(sae, list(latents), _amounts(bundle, list(latents), a)).sum(0, keepdim=True)
        written = sae.cfg.target_hook or sae.cfg.hook_name  # a transcoder's latents write its target hook
        return mod.generate(model, tokens, n_new, temperature, seed, steer=mod.Steer(written, d))

    texts = {"unsteered": model.tokenizer.decode(mod.generate(model, tokens, n_new, temperature, seed)[0, P:]),
             "steered": model.tokenizer.decode(run(alpha)[0, P:])}
    curve = None
    if sweep:
        import torch

        targets = mod.lens_tokens(model, sae, latents=torch.tensor(list(latents))).reshape(-1)
        curve = [float(torch.isin(run(a)[0, P:].cpu(), targets.cpu()).float().mean()) for a in SWEEP]
    return texts, curve


def page() -> None:
    cur = state.begin("Steering")
    if cur is None:
        return
    entry, bundle = cur
    mod = evaluator()
    if mod is None:
        st.warning("The steering evaluator is not available in this saelab (no `saelab.eval.steering` with "
                   f"{', '.join(NEEDED)}), so this page cannot steer. Every other page works without it.")
        return
    try:
        model_name, sae_path = state.model_name(bundle), state.sae_dir(entry, bundle)
        state.load_model(model_name)
        state.load_sae(sae_path)
    except Exception as e:  # noqa: BLE001 -- any load failure: this page says so, the others keep working
        state.model_error(e, "Steering")
        return
    c = st.columns([2, 2, 3])
    text = c[0].text_input("latents", value=state.qp("latents", state.qp("latent", "0")), key="s_latents",
                           help="comma-separated latent ids; their decoder directions are added together")
    try:
        alpha0 = min(max(float(state.qp("alpha", 4.0)), -10.0), 10.0)
    except ValueError:
        alpha0 = 4.0
    alpha = c[1].slider("strength α (× each latent's max activation)", -10.0, 10.0, alpha0, step=0.5, key="s_alpha")
    prompt = c[2].text_input("prompt", value=state.qp("prompt", "def "), key="s_prompt")
    c = st.columns(3)
    n_new = c[0].number_input("new tokens", 1, 100, 24, key="s_new")
    temperature = c[1].number_input("temperature", 0.0, 2.0, 0.7, step=0.1, key="s_temp")
    seed = c[2].number_input("seed", 0, 2**31 - 1, 0, key="s_seed")
    try:
        latents = parse_latents(text, bundle.n_latents)
    except SaelabError as e:
        state.show_error(e)
        return
    state.set_params(latents=",".join(map(str, latents)), alpha=alpha, prompt=prompt)
    if not latents:
        st.info("Give at least one latent id.")
        return
    sweep = st.toggle("strength sweep (share of generated tokens in the latents' top logit-lens tokens)",
                      key="s_sweep")
    try:
        texts, curve = _generate(model_name, sae_path, entry.bundle, tuple(latents), float(alpha), prompt,
                                 int(n_new), float(temperature), int(seed), sweep)
    except SaelabError as e:
        state.show_error(e)
        return
    c = st.columns(2)
    for col, key in zip(c, ("unsteered", "steered")):
        on = f" (α = {alpha:g} on {', '.join(map(str, latents))})" if key == "steered" else ""
        col.markdown(f"**{key}**{on}")
        col.code(prompt + texts[key], language=None)
    if curve is not None:
        st.plotly_chart(render.line_chart(list(SWEEP), {"concept tokens": curve}, "Strength sweep", "α"),
                        config=render.PLOT_CONFIG, key="s_curve")
