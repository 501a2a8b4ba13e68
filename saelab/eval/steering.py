"""Steering with SAE latents, and the input / output scores of every latent (Arad, Mueller & Belinkov 2025,
"SAEs Are Good for Steering – If You Select the Right Features"; evals notes §3).

Steering. At the SAE's hook, add `amount · d_f` to the activation, d_f = W_dec[f] in raw activation space
(`splice.decoder_directions`). With the SAE's error term kept this is exactly "raise latent f by `amount` and
decode" (decoding is linear in the code); `mode="clamp"` instead sets latent f to `amount`
(x ← x + (amount − f(x))·d_f, the error term kept) through `splice.splice`. The amount at a steered position t is
(`strength_scale`, `STRENGTH_SCALES`):
    "position" (default, the paper's rule):  amount_t = α · max_j |f_j(x_t)|
        the largest latent activation of the SAE at that very position (x_t the unsteered activation there; its
        magnitude, for signed codes such as AbsTopK's, where the strongest latent may be negative);
    "corpus" (saelab's earlier rule):        amount = α · max_activation[f]
        the latent's own largest activation over a corpus sample, the same at every position.
On the chosen positions (all by default, or from a position on: `start`). Generation (`generate`) recomputes the
whole sequence each step (no KV cache), so a steered position is steered identically at every step; the paper
steers the last position of each KV-cached step, which is the same thing. The paper's α grid is `ALPHAS`. For a
g-SAE, f(x_t) is its gradient-free encode: at the position being generated the LM-loss gradient is exactly 0 (it
predicts nothing yet), where its gradient rule is plain TopK.

Logit lens of latent f:  LL_f = softmax(W_U · ln_final(d_f) + b_U);  T_f = its top-20 tokens.
Input score (is the latent about its input?):
    the latent's top-activating rows of a corpus sample (≤ 100; NaN below 10), t* = the token at each row's peak;
    input_score_f = share of those rows with t* ∈ T_f.
Output score (does amplifying it make the model say T_f?), the paper's code adapted to code text:
    on a fixed neutral prompt (`SCORE_PROMPT`, a fresh line after an import), at the LAST position only:
    f ← f + 10 · max_j |f_j(last)| (error term kept), p = next-token distribution, r_t = rank of t in p (0 = top):
    output_score_f = (1 − min_{t∈T_f} r_t / V) · max_{t∈T_f} p_t.
    All latents are scored in batches of prompt copies (one latent per row), never one forward per latent.
    A g-SAE has one output score: the last position predicts nothing, so its LM-loss gradient is exactly 0 and the
    gradient rule picks what TopK picks there.
g-SAEs (`splice.infers_with_grad`): the corpus sweep behind the input score and max activation encodes with the
LM-loss gradient at the hook (one backward per batch, the activation cache's loss); the TopK fallback's input
score, max activation and example count are reported beside it (`SteeringScores.fallback`, columns
`*_topk_fallback`).
Steering success (the paper's automatic metric, generation_success@k): over generations from neutral code
prefixes (`STEER_PROMPTS`), the mean number of generated tokens in T_f[:k]; we also report it as a rate per
generated token, and fluency = the unsteered model's cross-entropy (nats/token) of the generated tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from saelab.errors import ConfigError
from saelab.eval.splice import (FALLBACK_RULE, GRAD_RULE, add_latents, capture, check_sae_fits, corpus_rows,
                                decoder_directions, default_special_ids, gather_rows, infers_with_grad, lm_loss_grad,
                                special_mask, splice)
from saelab.files import write_atomic, write_text_atomic
from saelab.models.loading import model_device

SCORE_PROMPT = "import os\n\n"
AMP_FACTOR = 10.0
N_LENS_TOKENS = 20
STEER_PROMPTS = ("\n", "def ", "import ", "class ", "    return ", "x = ", "# ", "if ")
ALPHAS = (0.0, 0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 20.0)  # the paper's grid
STRENGTH_SCALES = ("position", "corpus")


# ================================================================================================ logit lens
@torch.no_grad()
def logit_lens(model, directions: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits [n, V] of the unembedding applied to ln_final(direction) for each direction row [n, d_model]."""
    out = []
    for i in range(0, directions.shape[0], batch):
        d = directions[i:i + batch].to(model_device(model), model.W_U.dtype).unsqueeze(1)
        out.append(model.unembed(model.ln_final(d))[:, 0].float().cpu())
    return torch.cat(out)


def lens_tokens(model, sae, k: int = N_LENS_TOKENS, latents: torch.Tensor | None = None) -> torch.Tensor:
    """T_f: the top-k logit-lens token ids [n, k] of each latent (all latents, or `latents`)."""
    d = decoder_directions(sae)
    if latents is not None:
        d = d[latents]
    return logit_lens(model, d).topk(k, dim=-1).indices


# ================================================================================================ corpus sweep
@dataclass
class ActivationSweep:
    """Per latent, over a corpus sample: its largest activation, and its top-activating rows (≤ n_top) as
    (latent, value, token at the row's peak), sorted by latent then value (descending). Positive values only:
    steering raises a latent along +d_f, and a signed latent's (AbsTopK's) negative values stand for −d_f."""

    n_latents: int
    n_tokens: int
    max_activation: np.ndarray  # [n_latents] float64, 0 for latents never active (never positive)
    top_latent: np.ndarray  # [m] latent of each top example
    top_value: np.ndarray  # [m]
    top_token: np.ndarray  # [m] token id at the peak
    top_row: np.ndarray  # [m] row of the sample
    top_position: np.ndarray  # [m] position in the row


@torch.no_grad()
def activation_sweep(model, sae, rows: torch.Tensor, n_top: int = 100, batch_rows: int = 16,
                     progress: bool = False, with_grad: bool = False) -> ActivationSweep:
    """One pass over token rows [R, L]: every latent's max activation and top-activating rows (BOS/EOS excluded).
    with_grad: encode with the LM-loss gradient at the hook (a g-SAE's own rule; full forward + one backward per
    batch) instead of `encode(x)`."""
    hook, n = sae.cfg.hook_name, sae.cfg.n_latents
    specials = default_special_ids(model)
    dev = model_device(model)
    lat_l, val_l, row_l, pos_l, tok_l = [], [], [], [], []
    it = range(0, rows.shape[0], batch_rows)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="activation sweep", unit="batch")
    n_tok = 0
    for i in it:
        tok = rows[i:i + batch_rows].to(dev)
        keep = ~special_mask(tok, specials)
        if with_grad:
            _, act, grad = lm_loss_grad(model, tok, hook)
            code = sae.encode(gather_rows(act, keep), grad=gather_rows(grad, keep))
        else:
            _, acts = capture(model, tok, hook)
            code = sae.encode(gather_rows(acts[hook], keep))
        where = keep.nonzero()  # [m, 2] (row, position) of each kept token, row-major like gather_rows
        act = code.values > 0  # (the class docstring: a signed latent's negative values are not its +d_f side)
        k = code.indices.shape[1]
        tpos = torch.arange(code.indices.shape[0], device=dev).unsqueeze(1).expand(-1, k)[act]
        lat_l.append(code.indices[act].cpu())
        val_l.append(code.values[act].double().cpu())
        row_l.append((where[tpos, 0] + i).cpu())
        pos_l.append(where[tpos, 1].cpu())
        tok_l.append(tok[where[tpos, 0], where[tpos, 1]].cpu())
        n_tok += int(keep.sum())
    lat, val, row, pos, tk = (torch.cat(a).numpy() for a in (lat_l, val_l, row_l, pos_l, tok_l))
    max_act = np.zeros(n)
    np.maximum.at(max_act, lat, val)
    # the peak of each (latent, row): sort by key then value descending, keep the first of each key
    key = lat.astype(np.int64) * rows.shape[0] + row
    order = np.lexsort((-val, key))
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    peak = order[first]
    # per latent, rows by peak value descending; keep the first n_top of each latent
    o = peak[np.lexsort((-val[peak], lat[peak]))]
    lat_o = lat[o]
    starts = np.searchsorted(lat_o, lat_o, side="left")
    keep_o = o[(np.arange(len(o)) - starts) < n_top]
    return ActivationSweep(n, n_tok, max_act, lat[keep_o], val[keep_o], tk[keep_o], row[keep_o], pos[keep_o])


def input_scores(sweep: ActivationSweep, lens: torch.Tensor, min_examples: int = 10) -> np.ndarray:
    """[n_latents]: share of each latent's top-activating rows whose peak token is in its lens tokens T_f
    (NaN with fewer than `min_examples` rows)."""
    T = lens.numpy()
    hit = (T[sweep.top_latent] == sweep.top_token[:, None]).any(1)
    count = np.bincount(sweep.top_latent, minlength=sweep.n_latents)
    hits = np.bincount(sweep.top_latent, weights=hit, minlength=sweep.n_latents)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count >= min_examples, hits / np.maximum(count, 1), np.nan)


# ================================================================================================ output score
@torch.no_grad()
def output_scores(model, sae, lens: torch.Tensor, prompt: str = SCORE_PROMPT, amp_factor: float = AMP_FACTOR,
                  batch: int = 256, latents: torch.Tensor | None = None, progress: bool = False) -> np.ndarray:
    """Output score of every latent (or of `latents`), `batch` latents per forward (one prompt copy per latent).

    At the last prompt position the latent is raised by amp_factor · max_j |f_j(last)| with the error term kept,
    i.e. the activation moves by that amount along d_f.
    """
    hook = sae.cfg.hook_name
    dev = model_device(model)
    tok = prompt_tokens(model, prompt).to(dev)
    _, acts = capture(model, tok, hook)
    amount = amp_factor * float(position_scale(sae, acts[hook][:, -1:])[0, -1])
    D = decoder_directions(sae)
    ids = torch.arange(sae.cfg.n_latents) if latents is None else torch.as_tensor(latents).long()
    V = model.cfg.d_vocab
    out = np.zeros(len(ids))
    it = range(0, len(ids), batch)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="output scores", unit="batch")
    for i in it:
        chunk = ids[i:i + batch]
        dirs = (amount * D[chunk]).to(dev)

        def add_last(act, hook, dirs=dirs):
            new = act.clone()
            flat = new.reshape(*act.shape[:2], -1)
            flat[:, -1] += dirs.to(act.dtype)
            return new

        logits = model.run_with_hooks(tok.expand(len(chunk), -1), fwd_hooks=[(hook, add_last)])[:, -1].float()
        p = logits.softmax(-1)
        T = lens[chunk].to(dev)
        pT = p.gather(1, T)
        rank = (p.unsqueeze(1) > pT.unsqueeze(2)).sum(-1)  # tokens strictly more likely: rank 0 = top
        out[i:i + len(chunk)] = ((1 - rank.min(1).values.double() / V) * pT.max(1).values.double()).cpu().numpy()
    return out


def prompt_tokens(model, prompt: str) -> torch.Tensor:
    """[1, P]: BOS + the prompt's tokens; ConfigError if it does not fit the model's context."""
    from saelab.data.packing import special_ids

    bos, _ = special_ids(model.tokenizer)
    ids = [bos] + model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > model.cfg.n_ctx:
        raise ConfigError(f"the prompt is {len(ids)} tokens with BOS, longer than the model's context "
                          f"({model.cfg.n_ctx})", hint="shorten --prompt")
    return torch.tensor([ids])


@dataclass
class SteeringScores:
    latent: np.ndarray
    output_score: np.ndarray
    input_score: np.ndarray
    max_activation: np.ndarray
    n_examples: np.ndarray  # top-activating rows found (≤ 100): the input score's sample size
    lens_tokens: np.ndarray  # [n, 20]
    meta: dict
    # a g-SAE: the columns above are its gradient rule's; {"input_score", "max_activation", "n_examples"} of the
    # TopK fallback
    fallback: dict | None = None

    def _repr_html_(self) -> str:  # Jupyter: the ten latents with the largest output score
        from saelab.display import grid_html

        o, i = self.output_score, self.input_score
        top = np.argsort(-o)[:10]
        return grid_html(["latent", "output score", "input score", "max activation"],
                         [[int(self.latent[j]), float(o[j]), float(i[j]), float(self.max_activation[j])] for j in top],
                         title=f"steering scores · top 10 of {len(o):,} latents by output score")

    def to_frame(self, tokenizer=None):
        import pandas as pd

        df = pd.DataFrame({"latent": self.latent, "output_score": self.output_score,
                           "input_score": self.input_score, "max_activation": self.max_activation,
                           "n_examples": self.n_examples, "lens_tokens": [list(map(int, r)) for r in self.lens_tokens]})
        for name, values in (self.fallback or {}).items():
            df[f"{name}_topk_fallback"] = values
        if tokenizer is not None:
            df["lens_text"] = [[tokenizer.decode([t]) for t in r[:5]] for r in self.lens_tokens]
        return df


def score_latents(model, sae, rows: torch.Tensor | None = None, n_tokens: int = 65_536, context_size: int = 128,
                  corpus=None, prompt: str = SCORE_PROMPT, batch: int = 256, progress: bool = False
                  ) -> tuple[SteeringScores, ActivationSweep]:
    """Input and output scores (and max activation, density) of every latent; one corpus sweep + n/batch
    forwards of the prompt."""
    from saelab.data.corpus import CorpusSpec

    check_sae_fits(model, sae)
    if rows is None:
        rows = corpus_rows(model, corpus if corpus is not None else CorpusSpec(), "validation", context_size,
                           max(1, math.ceil(n_tokens / context_size)))
    with_grad = infers_with_grad(sae)
    sweep = activation_sweep(model, sae, rows, progress=progress, with_grad=with_grad)
    lens = lens_tokens(model, sae)
    out = output_scores(model, sae, lens, prompt=prompt, batch=batch, progress=progress)
    n = sae.cfg.n_latents
    meta = {"prompt": prompt, "amp_factor": AMP_FACTOR, "n_lens_tokens": N_LENS_TOKENS, "n_tokens": sweep.n_tokens,
            "hook_name": sae.cfg.hook_name, "n_top_examples": 100, "min_examples": 10,
            "definitions": "saelab.eval.steering module docstring"}
    fallback = None
    if with_grad:
        plain = activation_sweep(model, sae, rows, progress=progress)
        fallback = {"input_score": input_scores(plain, lens), "max_activation": plain.max_activation,
                    "n_examples": np.bincount(plain.top_latent, minlength=n)}
        meta["rule"], meta["fallback_rule"] = GRAD_RULE, FALLBACK_RULE
    return SteeringScores(np.arange(n), out, input_scores(sweep, lens), sweep.max_activation,
                          np.bincount(sweep.top_latent, minlength=n), lens.numpy(), meta, fallback), sweep


def format_scores(scores: SteeringScores) -> str:
    o = scores.output_score

    def inputs(i):
        return (f"input score median {np.nanmedian(i):.4f} (max {np.nanmax(i):.4f}; {int(np.isnan(i).sum())} "
                f"latents with < 10 examples)")

    text = f"steering scores of {len(o):,} latents: output score median {np.median(o):.4f} (max {o.max():.4f})"
    if scores.fallback is None:
        return f"{text}, {inputs(scores.input_score)}"
    return (f"{text}; by rule\n  {GRAD_RULE}: {inputs(scores.input_score)}"
            f"\n  {FALLBACK_RULE}: {inputs(scores.fallback['input_score'])}")


def write_scores(scores: SteeringScores, out_dir, tokenizer=None):
    """RUN/eval/steering_scores.parquet (one row per latent) + steering_scores.json (settings), each crash-safe."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = scores.to_frame(tokenizer)
    path = write_atomic(out_dir / "steering_scores.parquet", lambda f: frame.to_parquet(f, index=False))
    write_text_atomic(out_dir / "steering_scores.json", json.dumps(scores.meta, indent=1))
    return path


# ================================================================================================ steering
@dataclass
class Steer:
    """Add `directions[b]` ([B, d]) at the hook on positions >= start of every row b: as they are (the amount
    included), or with `scale_sae` times that SAE's largest latent activation at each position (`position_scale`:
    the paper's strength rule, directions then hold α·d_f)."""

    hook_name: str
    directions: torch.Tensor
    start: int = 0
    scale_sae: object = None

    def hook(self, act, hook):
        new = act.clone()
        flat = new.reshape(*act.shape[:2], -1)
        add = self.directions.to(act.device, act.dtype).unsqueeze(1)
        if self.scale_sae is not None:
            add = add * position_scale(self.scale_sae, flat[:, self.start:]).unsqueeze(-1).to(act.dtype)
        flat[:, self.start:] += add
        return new


def position_scale(sae, act: torch.Tensor) -> torch.Tensor:
    """[B, L]: max_j |f_j(x)| of the SAE's code at each position of act [B, L, d] (0 where no latent is active), the
    unit of the paper's steering strength."""
    B, L = act.shape[:2]
    if L == 0:
        return act.new_zeros(B, 0)
    return strongest(sae.encode(act.reshape(B * L, -1))).reshape(B, L)


def strongest(code) -> torch.Tensor:
    """[n]: each token's largest |value| (= its largest value for codes >= 0; a signed code's strongest latent may be
    negative), 0 where none is active."""
    return code.values.abs().amax(1)


def check_strength_scale(strength_scale: str) -> None:
    if strength_scale not in STRENGTH_SCALES:
        raise ConfigError(f"strength scale {strength_scale!r}; use one of {', '.join(STRENGTH_SCALES)}",
                          hint="position: α × the largest latent activation at each position (the paper's rule); "
                               "corpus: α × the latent's largest activation over a corpus sample")


def steer_directions(sae, latents: Sequence[int] | torch.Tensor, amounts) -> torch.Tensor:
    """amount_j · d_{latent_j} for each j: [m, d] (sum the rows to steer along several latents at once);
    ConfigError for a latent index out of range."""
    D = decoder_directions(sae)
    lat = torch.as_tensor(latents).long()
    amt = torch.as_tensor(amounts, dtype=D.dtype)
    n = sae.cfg.n_latents
    if lat.numel() and (int(lat.min()) < 0 or int(lat.max()) >= n):
        bad = int(lat.max()) if int(lat.max()) >= n else int(lat.min())
        raise ConfigError(f"latent {bad} is out of range: the SAE has {n} latents (0..{n - 1})")
    return amt.unsqueeze(-1) * D[lat]


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.7, seed: int = 0,
             steer: Steer | None = None, clamp: tuple | None = None) -> torch.Tensor:
    """Sample continuations of token rows [B, P] (all of the same length), recomputing the whole sequence each
    step, with the steering hook (or a clamp: (sae, latents [B], values [B], start[, per_position]); per_position:
    each value times the SAE's largest latent activation at the position) active. Temperature 0 is greedy.
    Returns [B, P + max_new_tokens]."""
    if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise ConfigError(f"prompt ({tokens.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's "
                          f"context ({model.cfg.n_ctx})", hint="shorten the prompt or --max-new-tokens")
    dev = model_device(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    seq = tokens.to(dev)
    for _ in range(max_new_tokens):
        logits = _forward(model, seq, steer, clamp)[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
        seq = torch.cat([seq, nxt], 1)
    return seq


def _forward(model, seq, steer: Steer | None, clamp):
    if clamp is not None:
        sae, lat, val, start, *per_position = clamp
        lat, val = torch.as_tensor(lat).long(), torch.as_tensor(val, dtype=torch.float32)

        def edit(site):
            B, L = site.shape[:2]
            pos = torch.arange(L).expand(B, L)[site.positions.cpu()]
            row = torch.arange(B).unsqueeze(1).expand(B, L)[site.positions.cpu()]
            on = pos >= start
            cur = site.code.to_dense(sae.cfg.n_latents).gather(1, lat[row].unsqueeze(1).to(site.code.values.device))
            target = val[row].to(cur.device)
            if per_position and per_position[0]:  # the code of each position is the one just encoded
                target = target * strongest(site.code).to(cur.device)
            delta = torch.where(on.to(cur.device), target - cur.squeeze(1), torch.zeros(()))
            site.code = add_latents(site.code, lat[row].unsqueeze(1), delta.unsqueeze(1))

        with splice(model, sae, keep_error=True, edit=edit):
            return model(seq)
    if steer is not None:
        return model.run_with_hooks(seq, fwd_hooks=[(steer.hook_name, steer.hook)])
    return model(seq)


@torch.no_grad()
def continuation_loss(model, seq: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """[B]: the (unsteered) model's mean cross-entropy, nats/token, of the tokens after the first n_prompt."""
    logits = model(seq)[:, n_prompt - 1:-1].float()
    lp = logits.log_softmax(-1).gather(-1, seq[:, n_prompt:].unsqueeze(-1)).squeeze(-1)
    return -lp.mean(1).cpu()


def concept_hits(seq: torch.Tensor, n_prompt: int, targets: torch.Tensor) -> torch.Tensor:
    """[B]: how many generated tokens of each row are in its target set (targets [B, k])."""
    gen = seq[:, n_prompt:].cpu()
    return (gen.unsqueeze(-1) == targets.cpu().unsqueeze(1)).any(-1).sum(1)


def steering_success(model, sae, latents: Sequence[int], alphas: Sequence[float], max_activation: np.ndarray | None,
                     lens: torch.Tensor, prompts: Sequence[str] = STEER_PROMPTS, max_new_tokens: int = 20,
                     temperature: float = 0.7, seed: int = 0, k: int = N_LENS_TOKENS, batch: int = 256,
                     progress: bool = False, strength_scale: str = "position") -> dict:
    """Generation success@k (mean count of generated tokens in T_f[:k]), its per-token rate, and fluency (the
    unsteered model's nats/token on the generations), per latent × α, over the prompts. Steering starts at the
    last prompt token (as in the paper, which steers the last position of each KV-cached step). All
    (latent, α) pairs of a prompt run in batched generations. The strength is α × the largest latent activation at
    each position (strength_scale "position", the paper's rule), or α × max_activation[f] ("corpus"; then
    max_activation, each latent's largest activation over a corpus sample, is needed)."""
    check_strength_scale(strength_scale)
    if strength_scale == "corpus" and max_activation is None:
        raise ConfigError("strength scale 'corpus' needs each latent's max activation")
    lat = torch.as_tensor(list(latents)).long()
    al = torch.as_tensor(list(alphas), dtype=torch.float32)
    pairs_lat = lat.repeat_interleave(len(al))
    pairs_alpha = al.repeat(len(lat))
    per_position = strength_scale == "position"
    amounts = pairs_alpha if per_position else \
        pairs_alpha * torch.as_tensor(max_activation, dtype=torch.float32)[pairs_lat]
    dirs = steer_directions(sae, pairs_lat, amounts)
    targets = lens[pairs_lat][:, :k]
    hits = torch.zeros(len(pairs_lat))
    ce = torch.zeros(len(pairs_lat))
    items = list(enumerate(prompts))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="steering", unit="prompt")
    for j, prompt in items:
        tok = prompt_tokens(model, prompt)
        P = tok.shape[1]
        for i in range(0, len(pairs_lat), batch):
            sl = slice(i, i + batch)
            rows = tok.expand(len(pairs_lat[sl]), -1)
            seq = generate(model, rows, max_new_tokens, temperature, seed + j,
                           steer=Steer(sae.cfg.hook_name, dirs[sl], start=P - 1,
                                       scale_sae=sae if per_position else None))
            hits[sl] += concept_hits(seq, P, targets[sl]).float()
            ce[sl] += continuation_loss(model, seq, P)
    n = len(prompts)
    success = (hits / n).reshape(len(lat), len(al))
    return {"latents": lat.tolist(), "alphas": al.tolist(), "strength_scale": strength_scale, "k": k,
            "n_prompts": n, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "success": success.tolist(), "rate": (success / max_new_tokens).tolist(),
            "fluency_nats": (ce / n).reshape(len(lat), len(al)).tolist()}


def ranking_experiment(model, sae, scores: SteeringScores, n: int = 20, alphas: Sequence[float] = (1.0, 2.0, 4.0),
                       min_output_score: float | None = None, **kw) -> dict:
    """The paper's claim: steering success of the top-n latents by output score vs the top-n by input score
    (latents with an input score only; each latent at its best α of the grid)."""
    out = np.nan_to_num(scores.output_score, nan=-1)
    inp = np.nan_to_num(scores.input_score, nan=-1)
    alive = scores.max_activation > 0
    if min_output_score is not None:
        alive &= scores.output_score >= min_output_score
    by_out = [int(i) for i in np.argsort(-np.where(alive, out, -np.inf), kind="stable")[:n]]
    by_in = [int(i) for i in np.argsort(-np.where(alive, inp, -np.inf), kind="stable")[:n]]
    lens = torch.as_tensor(scores.lens_tokens)
    res = steering_success(model, sae, by_out + by_in, alphas, scores.max_activation, lens, **kw)
    best = np.asarray(res["success"]).max(1)
    s_out, s_in = float(best[:n].mean()), float(best[n:].mean())
    return {"n": n, "alphas": list(alphas), "top_by_output": by_out, "top_by_input": by_in,
            "success_top_output": s_out, "success_top_input": s_in,
            "ratio": s_out / s_in if s_in > 0 else math.inf,
            "output_score_of_top_input": [float(scores.output_score[i]) for i in by_in],
            "input_score_of_top_output": [float(scores.input_score[i]) for i in by_out], "detail": res}


def output_score_correlation(model, sae, scores: SteeringScores, n: int = 64, alphas: Sequence[float] = ALPHAS,
                             **kw) -> dict:
    """The paper's qualitative finding (high output score → steering success), measured on this SAE: `n` live
    latents spread evenly over the output-score ranking are each steered at every α (`steering_success`, keywords
    passed on, e.g. strength_scale, prompts, max_new_tokens); Spearman's ρ between output score and success@k at
    each latent's best α, and at each α alone. With α = 0 in the grid (no steering: a latent whose top logit-lens
    tokens are common tokens hits them unsteered too), also ρ with the gain, best success − success at α = 0: the
    part steering adds."""
    from scipy.stats import spearmanr

    alive = np.flatnonzero(scores.max_activation > 0)
    if len(alive) < 3:
        raise ConfigError(f"only {len(alive)} latents ever fire in the scores' corpus sample; nothing to rank")
    order = alive[np.argsort(-scores.output_score[alive], kind="stable")]
    pick = order[np.unique(np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int))]
    res = steering_success(model, sae, pick.tolist(), alphas, scores.max_activation,
                           torch.as_tensor(scores.lens_tokens), **kw)
    success = np.asarray(res["success"])
    out = scores.output_score[pick]
    best = success.max(1)

    def rho(y):
        return math.nan if np.ptp(y) == 0 else float(spearmanr(out, y)[0])

    half = len(pick) // 2  # pick is in descending output score
    result = {"n": len(pick), "latents": pick.tolist(), "output_score": out.tolist(), "alphas": list(alphas),
              "strength_scale": res["strength_scale"], "success": success.tolist(), "best_success": best.tolist(),
              "best_alpha": [float(alphas[j]) for j in success.argmax(1)],
              "spearman_best": rho(best), "spearman_per_alpha": [rho(success[:, j]) for j in range(len(alphas))],
              "success_top_half": float(best[:half].mean()), "success_bottom_half": float(best[half:].mean()),
              "detail": res}
    if 0.0 in list(alphas):
        gain = best - success[:, list(alphas).index(0.0)]
        result.update(spearman_gain=rho(gain), gain_top_half=float(gain[:half].mean()),
                      gain_bottom_half=float(gain[half:].mean()))
    return result


__all__ = ["SCORE_PROMPT", "STEER_PROMPTS", "ALPHAS", "STRENGTH_SCALES", "logit_lens", "lens_tokens",
           "ActivationSweep", "activation_sweep", "input_scores", "output_scores", "prompt_tokens", "SteeringScores",
           "score_latents", "write_scores", "Steer", "position_scale", "check_strength_scale", "steer_directions",
           "generate", "continuation_loss", "concept_hits", "steering_success", "ranking_experiment",
           "output_score_correlation"]
