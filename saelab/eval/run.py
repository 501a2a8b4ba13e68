"""`saelab eval RUN`: core metrics (RUN/eval/core.json), sparse probing (probing.json) and steering scores
(steering_scores.parquet) of a trained SAE on held-out text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saelab.eval.steering import ALPHAS, STRENGTH_SCALES, check_strength_scale
from saelab.files import write_text_atomic
from saelab.settings import check, setting

STEER_TOKENS = 16_384  # held-out tokens of the corpus pass that finds each latent's max activation


def load_run(run: Path, require: str = ""):
    """(SAE, model, TrainConfig, its `RunDir`) of a run directory or a bare SAE directory, with the model and corpus
    it was trained on. `require`: what needs an SAE rather than a transcoder (`require_sae`), refused before the
    model loads."""
    from saelab.config import TrainConfig, load_config
    from saelab.data.corpus import check_source
    from saelab.models import check_hook_names, load_model
    from saelab.rundir import RunDir
    from saelab.sae import SparseAutoencoder

    rd = RunDir.open(run, missing="no such file or directory", file="a file",
                     hint="give a run directory made by `saelab train` or an SAE directory "
                          "(cfg.json + sae_weights.safetensors)")
    cfg = load_config(TrainConfig, rd.config) if rd.config.exists() else TrainConfig()
    sae = SparseAutoencoder.load(rd.sae)
    if require:
        require_sae(sae, require, run)
    check_source(cfg.corpus, "validation")
    model_name = sae.cfg.model_name or cfg.model.name
    model = load_model(model_name, device=cfg.model.resolved_device(), dtype=cfg.model.dtype)
    check_hook_names(model, [sae.cfg.hook_name, *([sae.cfg.target_hook] if sae.cfg.target_hook else [])])
    return sae, model, cfg, rd  # (an SAE of another model: one clear line above, not a failed forward)


def require_sae(sae, what: str, run: Path) -> None:
    """`what` reads and writes an SAE's one hook; a transcoder (reads one hook, writes another) is refused."""
    if sae.cfg.target_hook:
        from saelab.errors import ConfigError

        raise ConfigError(f"{run} is a transcoder ({sae.cfg.hook_name} → {sae.cfg.target_hook}); {what} needs an SAE "
                          f"that reads and writes one hook", hint="`saelab eval RUN --suite core` evaluates a "
                                                                  "transcoder (against its target hook)")


def evaluate_run(run: Path, tokens: int, loaded=None):
    """Core metrics of the SAE of a run directory (or a bare SAE directory) with the model and corpus it was trained
    on → (CoreMetrics, RUN/eval/core.json); a g-SAE's with the LM-loss gradient and, in `topk_fallback`, without.
    `loaded`: `load_run(run)`'s result, to load the model once."""
    from saelab.eval.core import evaluate_core

    sae, model, cfg, rd = loaded or load_run(run)
    metrics = evaluate_core(model, sae, corpus=cfg.corpus, split="validation", n_tokens=tokens,
                            context_size=cfg.context_size)
    return metrics, _write_json(rd.core, metrics.to_dict(), indent=2)


def probe_run(run: Path, tokens: int | None = None, progress: bool = True, loaded=None, settings=None, **fields):
    """Sparse probing of a run's SAE: the reference code tasks on `tokens` held-out tokens (or a user's labelled data
    at `level` "sequence": text + label rows, or "token": text + character spans per task) → (ProbingResult,
    RUN/eval/probing.json). `settings`: a `ProbingSettings`, or its fields as keywords (selection, max_density,
    ks, data, level, text_field, label_field, pooling)."""
    from saelab.eval.probing import (ProbingSettings, gather_sequence_data, gather_span_data, probe_tasks,
                                     reference_data)
    from saelab.eval.splice import infers_with_grad

    st = settings if settings is not None else ProbingSettings(**fields)
    if tokens is None and not st.data:
        raise TypeError("probe_run: the reference tasks need a token budget (tokens)")
    labelled = st.labelled  # read (and checked) before the model loads: a bad line fails at once
    sae, model, cfg, rd = loaded or load_run(run, require="sparse probing")
    require_sae(sae, "sparse probing", run)  # a `loaded` run
    with_grad = infers_with_grad(sae)  # a g-SAE: activations with the LM-loss gradient, its fallback probed beside
    if st.data and st.level == "token":
        rows, tasks = labelled
        pd = gather_span_data(model, sae.cfg.hook_name, rows, tasks, context_size=cfg.context_size, progress=progress,
                              with_grad=with_grad)
    elif st.data:
        pd = gather_sequence_data(model, sae, sae.cfg.hook_name, labelled, name=Path(st.data).stem or "user",
                                  pooling=st.pooling, context_size=cfg.context_size)
    else:
        pd = reference_data(model, sae.cfg.hook_name, cfg.corpus, max_tokens=tokens, context_size=cfg.context_size,
                            progress=progress, with_grad=with_grad)
    result = probe_tasks(pd, sae, ks=st.ks, selection=st.selection, progress=progress, max_density=st.max_density)
    return result, _write_json(rd.probing, result.to_dict())


def score_run(run: Path, tokens: int, progress: bool = True, loaded=None):
    """Input and output scores of every latent of a run's SAE → (SteeringScores,
    RUN/eval/steering_scores.parquet (+ .json))."""
    from saelab.eval.steering import score_latents, write_scores

    sae, model, cfg, rd = loaded or load_run(run, require="steering scores")
    require_sae(sae, "steering scores", run)  # a `loaded` run
    scores, _ = score_latents(model, sae, n_tokens=tokens, context_size=cfg.context_size, corpus=cfg.corpus,
                              progress=progress)
    return scores, write_scores(scores, rd.eval, model.tokenizer)


def _write_json(path: Path, obj, indent: int = 1) -> Path:
    """Write JSON (no final newline) crash-safely, its folder made first: nothing half-written is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(obj, indent=indent))


@dataclass
class SteerSettings:
    """`saelab steer`'s settings (`saelab.steer`'s keywords), checked when built. `alpha`: one strength, or one per
    latent; with `sweep`, two or more are the grid (else the paper's, `ALPHAS`)."""

    alpha: Sequence[float] = setting((4.0,), "strength in units of --strength-scale; one, or one per --latent; with "
                                     "--sweep, several give the grid", repeat=True,
                                     default_text="4; with --sweep the paper's " + ", ".join(f"{a:g}" for a in ALPHAS))
    strength_scale: str = setting(STRENGTH_SCALES[0], "what α multiplies: position (the paper's rule): the largest "
                                  "latent activation of the SAE at each steered position; corpus: the latent's own "
                                  "largest activation over held-out text (RUN/eval/steering_scores.parquet, else a "
                                  f"{STEER_TOKENS:,}-token pass)", choices=STRENGTH_SCALES)
    prompt: str = setting("", "text to continue", default_text="a newline; --sweep: 8 neutral code prefixes")
    max_new_tokens: int = setting(30, "tokens to generate")
    temperature: float = setting(0.7, "sampling temperature; 0 = greedy")
    seed: int = setting(0, "sampling seed")
    mode: str = setting("add", "add: add α·scale·d_f; clamp: set the latent to α·scale, SAE error term kept",
                        choices=("add", "clamp"))
    sweep: bool = setting(False, "concept success and fluency over a strength grid")
    tokens: int = STEER_TOKENS  # strength_scale "corpus" without RUN/eval/steering_scores.parquet: the pass's tokens

    def __post_init__(self):
        check_strength_scale(self.strength_scale)
        check(self.max_new_tokens > 0, "--max-new-tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.temperature >= 0, "--temperature", f"must be >= 0, got {self.temperature}")
        check(self.mode in ("add", "clamp"), "--mode", f"{self.mode!r}; use add or clamp")
        self.alpha = [float(a) for a in self.alpha]


def steer_run(run: Path, latents: list[int], settings: SteerSettings) -> tuple[dict, list[Path]]:
    """`saelab steer`: steered vs unsteered generations of a prompt (several latents at once), or with sweep=True
    concept success and fluency over a strength grid per latent (default: the paper's, `ALPHAS`), written to
    RUN/eval/steer_sweep_<latents>.json and .html (Plotly). Amounts are α × the largest latent activation at each
    position (strength_scale "position", the paper's rule) or α × each latent's max activation over `tokens`
    held-out tokens ("corpus"; read from RUN/eval/steering_scores.parquet when there). An empty prompt is a
    newline, or for a sweep the neutral code prefixes STEER_PROMPTS. → (result, files written): the result is
    `steering_success`'s dict (+ lens_tokens) for a sweep, else the settings with the `steered` and `unsteered`
    continuations; `format_steer` turns it into the command's text."""
    import torch

    from saelab.errors import ConfigError
    from saelab.eval.splice import check_sae_fits
    from saelab.eval.steering import Steer, generate, lens_tokens, prompt_tokens, steer_directions, steering_success

    st = settings
    alphas, sweep, mode, strength_scale = st.alpha, st.sweep, st.mode, st.strength_scale
    max_new_tokens, temperature, seed = st.max_new_tokens, st.temperature, st.seed
    prompt = st.prompt if (st.prompt or sweep) else "\n"  # a sweep with no prompt: the neutral code prefixes
    sae, model, cfg, rd = load_run(run, require="steering")
    check_sae_fits(model, sae)
    n = sae.cfg.n_latents
    for f in latents:
        if not 0 <= f < n:
            raise ConfigError(f"latent {f} is out of range: the SAE has {n} latents (0..{n - 1})")
    tok = prompt_tokens(model, prompt)
    if tok.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise ConfigError(f"the prompt is {tok.shape[1]} tokens with BOS; with {max_new_tokens} new tokens that "
                          f"exceeds the model's context ({model.cfg.n_ctx})", hint="shorten --prompt")
    per_position = strength_scale == "position"
    max_act = None if per_position else _max_activations(rd.steering_scores, model, sae, cfg, st.tokens)
    lat = torch.as_tensor(latents)
    if not sweep:
        if len(alphas) not in (1, len(latents)):
            raise ConfigError(f"give one --alpha, or one per latent ({len(latents)}); got {len(alphas)}")
        al = torch.as_tensor(alphas * len(latents) if len(alphas) == 1 else alphas, dtype=torch.float32)
        amounts = al if per_position else al * torch.as_tensor(max_act, dtype=torch.float32)[lat]
        direction = steer_directions(sae, lat, amounts).sum(0, keepdim=True)
        if mode == "clamp":
            if len(latents) != 1:
                raise ConfigError("--mode clamp steers one latent at a time", hint="give a single --latent")
            steered = generate(model, tok, max_new_tokens, temperature, seed,
                               clamp=(sae, lat[:1], amounts[:1], 0, per_position))
        else:
            steered = generate(model, tok, max_new_tokens, temperature, seed,
                               steer=Steer(sae.cfg.hook_name, direction, scale_sae=sae if per_position else None))
        plain = generate(model, tok, max_new_tokens, temperature, seed)
        P = tok.shape[1]
        dec = model.tokenizer.decode
        return {"prompt": prompt, "latents": list(latents), "alphas": al.tolist(), "strength_scale": strength_scale,
                "max_activation": None if per_position else [round(float(max_act[f]), 3) for f in latents],
                "mode": mode, "seed": seed, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "unsteered": dec(plain[0, P:].tolist()), "steered": dec(steered[0, P:].tolist())}, []
    grid = sorted(set(alphas)) if len(alphas) > 1 else list(ALPHAS)
    lens = lens_tokens(model, sae)
    kw = {"prompts": [prompt]} if prompt else {}  # no prompt: the neutral code prefixes STEER_PROMPTS
    res = steering_success(model, sae, latents, grid, max_act, lens, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, strength_scale=strength_scale, **kw)
    res["lens_tokens"] = {str(f): [model.tokenizer.decode([t]) for t in lens[f][:10].tolist()] for f in latents}
    path = _write_json(rd.steer_sweep(latents), res)
    html = write_text_atomic(path.with_suffix(".html"), sweep_figure(res).to_html(include_plotlyjs="cdn"))
    return res, [path, html]


def format_steer(res: dict) -> str:
    """`saelab steer`'s text for `steer_run`'s result: the two continuations, or the sweep's table."""
    if "success" not in res:
        return "\n".join([f"prompt: {res['prompt']!r}   latents {res['latents']}, α {res['alphas']} × "
                          f"{_strength_unit(res)} ({res['mode']}, all positions; seed {res['seed']}, "
                          f"temperature {res['temperature']})",
                          "--- unsteered ---", res["unsteered"], "--- steered ---", res["steered"]])
    lines = [f"{'latent':>7} {'alpha':>6} {'success@' + str(res['k']):>11} {'rate':>6} {'fluency (nats)':>15}"]
    for i, f in enumerate(res["latents"]):
        for j, a in enumerate(res["alphas"]):
            lines.append(f"{f:>7} {a:>6g} {res['success'][i][j]:>11.2f} {res['rate'][i][j]:>6.3f} "
                         f"{res['fluency_nats'][i][j]:>15.3f}")
    lines.append(f"(alpha × {_strength_unit(res)})")
    return "\n".join(lines)


def _strength_unit(res: dict) -> str:
    """What α multiplies, in words."""
    if res.get("strength_scale", "corpus") == "position":
        return "the largest latent activation at each position"
    ma = res.get("max_activation")
    return "each latent's max activation over a corpus sample" + (f" {ma}" if ma else "")


def _max_activations(scores: Path, model, sae, cfg, tokens: int):
    """Each latent's max activation: from `scores` (RUN/eval/steering_scores.parquet) if it is there, else a corpus
    sweep."""
    import math

    import pandas as pd

    from saelab.eval.splice import corpus_rows
    from saelab.eval.steering import activation_sweep

    if scores.exists():
        df = pd.read_parquet(scores, columns=["latent", "max_activation"])
        if len(df) == sae.cfg.n_latents:
            return df.sort_values("latent")["max_activation"].to_numpy().copy()  # writable, for torch
    rows = corpus_rows(model, cfg.corpus, "validation", cfg.context_size, max(1, math.ceil(tokens / cfg.context_size)))
    return activation_sweep(model, sae, rows).max_activation


def sweep_figure(res: dict):
    """Plotly: a sweep's concept success and fluency against α, a line per latent (its HTML page)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"concept success@{res['k']} (target tokens per "
                                                        f"generation)", "fluency: unsteered model's nats/token"))
    for i, f in enumerate(res["latents"]):
        fig.add_trace(go.Scatter(x=res["alphas"], y=res["success"][i], name=f"latent {f}", legendgroup=str(f)),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=res["alphas"], y=res["fluency_nats"][i], name=f"latent {f}",
                                 legendgroup=str(f), showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text=f"α (× {_strength_unit({**res, 'max_activation': None})})")
    return fig
