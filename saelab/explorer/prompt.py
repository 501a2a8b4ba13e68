"""Prompt view: type code or text → the SAE's latents on every token (the model runs live; model and SAE are
cached once per process). Pick a token to rank latents by it; open any latent's page. With ?latent=I the text is
also coloured by that latent (Neuronpedia's "test your own text"). URL: ?sae=NAME&text=...&pos=3&latent=I."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from saelab.explorer import render, state

DEFAULT_TEXT = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n"
MAX_TOKENS = 256


@dataclass
class PromptCodes:
    texts: list[str]  # display string of each scored token (BOS dropped)
    indices: np.ndarray  # int64 [T, K] latent ids
    values: np.ndarray  # float32 [T, K]; active = value != 0

    def latent_values(self, latent: int) -> np.ndarray:
        """[T] the latent's value at each token (0 where it is not in the code)."""
        return np.where(self.indices == latent, self.values, 0).sum(1).astype(np.float32)

    def ranking(self, positions: list[int]) -> pd.DataFrame:
        """Latents active at the chosen tokens, by the sum of their values there (Neuronpedia's token search),
        largest |sum| first: a signed latent (AbsTopK) strongly negative there ranks with the strongly positive."""
        acc: dict[int, float] = {}
        for p in positions:
            for j, v in zip(self.indices[p], self.values[p]):
                if v != 0:
                    acc[int(j)] = acc.get(int(j), 0.0) + float(v)
        df = pd.DataFrame({"latent": list(acc), "value": list(acc.values())})
        order = np.argsort(-df["value"].abs().to_numpy(), kind="stable")
        return df.iloc[order].reset_index(drop=True)


def encode_prompt(model, sae, vocab: list[str], text: str) -> PromptCodes:
    """Tokenise (BOS first, as in training), run the model to the SAE's hook, encode every scored token."""
    import torch

    from saelab.activations.capture import HookCapture
    from saelab.data.packing import encode_batch, special_ids

    bos, _ = special_ids(model.tokenizer)
    ids = [bos] + encode_batch(model.tokenizer, [text])[0][: min(MAX_TOKENS, model.cfg.n_ctx) - 1]
    with torch.no_grad():
        acts, _ = HookCapture(model, [sae.cfg.hook_name], kept_from=1)(torch.tensor([ids]))
        code = sae.encode(acts[sae.cfg.hook_name].float())
    return PromptCodes([vocab[i] if i < len(vocab) else "?" for i in ids[1:]], code.indices.cpu().numpy(),
                       code.values.float().cpu().numpy())


@st.cache_data(show_spinner="Running the model…", max_entries=64)
def _codes(model_name: str, sae_path: str, bundle_path: str, text: str) -> PromptCodes:
    return encode_prompt(state.load_model(model_name), state.load_sae(sae_path),
                         state.open_bundle(bundle_path).vocab, text)


def _tokens_html(codes: PromptCodes, values: np.ndarray, selected: int | None) -> str:
    vmax = float(np.abs(values).max()) or 1.0
    parts = [render.CSS, '<div class="xp-ex">']
    for p, (t, v) in enumerate(zip(codes.texts, values)):
        top = [(int(j), float(x)) for j, x in sorted(zip(codes.indices[p], codes.values[p]), key=lambda z: -abs(z[1]))
               if x != 0][:5]
        tip = f"{t!r} · position {p + 1} · " + ", ".join(f"#{j} {x:.3g}" for j, x in top)
        parts.append(render.token_span(t, float(v), vmax, tip, "xp-sel" if p == selected else ""))
    parts.append("</div>")
    return "".join(parts)


def page() -> None:
    cur = state.begin("Prompt view")
    if cur is None:
        return
    entry, bundle = cur
    text = st.text_area("code or text", value=state.qp("text", DEFAULT_TEXT), height=140, key="p_text")
    try:
        sae_path = state.sae_dir(entry, bundle)
        codes = _codes(state.model_name(bundle), sae_path, entry.bundle, text)
    except Exception as e:  # noqa: BLE001 -- any load failure: this page says so, the others keep working
        state.model_error(e, "The prompt view")
        return
    if not codes.texts:
        st.info("Type some text to see its latents.")
        return
    state.set_params(text=text)
    latent = state.qp("latent")
    focus = None
    if latent is not None:
        focus = state.latent_param(bundle)
    if focus is not None:
        vals = codes.latent_values(focus)
        stats = state.latent_view(entry.bundle, focus).stats
        if bundle.signed_codes:  # red below zero
            st.markdown(f"Coloured by **latent {focus}** (min {vals.min():.3g}, max {vals.max():.3g} on this text; "
                        f"its bundle range is {stats.min:.3g} to {stats.max:.3g}).")
        else:
            st.markdown(f"Coloured by **latent {focus}** (max {vals.max():.3g} on this text; its bundle max is "
                        f"{stats.max:.3g}).")
        state.latent_link(entry, focus, f"back to latent {focus}")
    else:
        vals = np.abs(codes.values).sum(1)  # total code mass per token
        st.caption("Colour: the sum of |values| of the active latents at each token; hover a token for its top "
                   "latents. Choose tokens below to rank latents by them.")
    labels = [f"{p + 1}: {t!r}" for p, t in enumerate(codes.texts)]
    pos = state.qp("pos")
    default = [int(p) for p in str(pos).split(",") if p.strip().isdigit() and int(p) < len(labels)] if pos else []
    chosen = st.multiselect("rank latents by these tokens", list(range(len(labels))), default=default,
                            format_func=lambda p: labels[p], key="p_pos")
    st.html(_tokens_html(codes, vals, chosen[0] if len(chosen) == 1 else None))
    state.set_params(pos=",".join(map(str, chosen)) or None)
    positions = chosen or list(range(len(labels)))
    rank = codes.ranking(positions)
    if len(rank):
        t = bundle.table()
        rank["density"] = t["density"].to_numpy()[rank["latent"].to_numpy()]
        rank.insert(0, "open", [state.latent_url(entry, int(i)) for i in rank["latent"]])
    st.subheader("Latents at " + ("the chosen tokens" if chosen else "all tokens") + f" ({len(rank)})")
    event = st.dataframe(rank.head(200), hide_index=True, key="p_rank", on_select="rerun",
                         selection_mode="single-row",
                         column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗")})
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:
        state.goto_latent(entry, int(rank["latent"].iloc[rows[0]]))
