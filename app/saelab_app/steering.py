"""Steering: pick latents and strengths, steered vs unsteered generations side by side, a strength sweep.

It uses the steering evaluator (`saelab.eval.steering`: a hook adding α·W_dec[f] at the SAE's hook during
generation). Until that module exists in this saelab, the page says so and the rest of the explorer is unaffected.
"""

from __future__ import annotations

import importlib

import streamlit as st

from saelab_app import state

NEEDED = ("steering_hook",)  # what the page calls in saelab.eval.steering


def evaluator():
    """The steering module when it is installed and has what the page needs, else None."""
    try:
        mod = importlib.import_module("saelab.eval.steering")
    except ImportError:
        return None
    return mod if all(hasattr(mod, n) for n in NEEDED) else None


def page() -> None:
    cur = state.begin("Steering")
    if cur is None:
        return
    entry, bundle = cur
    mod = evaluator()
    if mod is None:
        st.warning("The steering evaluator is not available in this saelab (no `saelab.eval.steering` with "
                   f"{', '.join(NEEDED)}), so this page cannot steer yet. Every other page works without it; "
                   "evaluator steering scores already in the run appear on each latent's page.")
        return
    try:
        state.load_model(state.model_name(bundle))
        state.load_sae(state.sae_dir(entry, bundle))
    except Exception as e:  # noqa: BLE001 -- any load failure: this page says so, the others keep working
        state.model_error(e, "Steering")
        return
    st.info("The steering evaluator is installed, but this explorer version does not drive it yet.")
