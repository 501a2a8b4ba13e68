"""Running a `TransformerBridge` with SAEs spliced in, and the plumbing every evaluator shares.

One module so that core metrics, probing, steering and activation/attribution patching cut the model at a hook
the same way. Everything works on batches of token rows `[B, L]` (packed rows start with BOS) and through
TransformerLens hooks, so any hook name of any bridge model works.

Rows and masks
    as_rows(rows, n_tokens)          stack token rows given as a tensor/array/iterable into LongTensor [N, L]
    corpus_rows(model, corpus, ...)  the first packed rows of a corpus split
    batches(rows, batch_rows, ...)   (start, tokens [b, L] on the model's device, special mask [b, L])
    default_special_ids(model)       tokenizer BOS/EOS/PAD ids
    special_mask(tokens, ids)        True at position 0 and at special ids
    prediction_mask(special)         True where the prediction at t (of t+1) counts
    gather_rows(act, keep)           [B, L, ...] activation → [n, d] rows at the True positions of keep [B, L]
    replace_rows(act, keep, values)  copy of act with those rows replaced

Forwards
    capture(model, tokens, hooks)    (logits or None, {hook: activation}) of one forward, truncated when it can be
                                     (at `saelab.activations.capture.stop_layer`, the one stopping rule)
    run_with_replacement(...)        logits with the hooked activation replaced by a given tensor

SAEs
    sae_reconstruct(sae, x)          (code, x̂) of raw activations [n, d] (a transcoder's x̂: its output)
    target_hook(sae)                 the hook a transcoder writes, "" for an SAE
    infers_with_grad(sae)            whether the SAE's encode selects with the LM-loss gradient (g-SAE)
    lm_loss_grad(model, tokens, h)   (logits, activation, gradient) at h of the clean LM loss, one backward
    decoder_directions(sae)          W_dec rows in raw activation space [n_latents, d]
    check_sae_fits(model, sae)       ModelError unless the SAE's hook, width and model name fit the model
    add_latents(code, ids, amounts)  a code with extra (latent, value) entries per token (decode sums repeats)
    splice(model, saes, ...)         context manager: while open, every forward of `model` replaces the activation
                                     at each SAE's hook by decode(encode(x)) (+ the error term x − x̂ if
                                     keep_error), optionally edited, and records a `SpliceSite` per hook with the
                                     code, the reconstruction and the error, as autograd leaves when track_grads.

Conventions: a hook activation [B, L, *rest] is flattened to [B, L, prod(rest)] before the SAE sees it (per-head
hooks); "active" means value != 0; all functions keep the model's dtype and device and never change its weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from saelab.models.loading import model_device

if TYPE_CHECKING:
    from saelab.sae.code import SparseCode


# ================================================================================================ rows
def as_rows(rows, n_tokens: int | None = None) -> torch.Tensor:
    """Stack rows given as a [N, L] tensor/array or an iterable of [B, L] / [L] tensors/arrays; with `n_tokens`,
    only the first ceil(n_tokens / L) rows are read (an unbounded iterable is fine)."""
    if isinstance(rows, (torch.Tensor, np.ndarray)):
        rows = [rows]
    out: list[torch.Tensor] = []
    have, max_rows = 0, None
    for r in rows:
        t = (r if isinstance(r, torch.Tensor) else torch.as_tensor(np.asarray(r))).long()
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"rows must be [B, L] token ids, got shape {tuple(t.shape)}")
        if n_tokens is not None and max_rows is None:
            max_rows = max(1, math.ceil(n_tokens / max(1, t.shape[1])))
        if max_rows is not None:
            t = t[: max_rows - have]
        out.append(t.cpu())
        have += t.shape[0]
        if max_rows is not None and have >= max_rows:
            break
    if have == 0:
        raise ValueError("no rows of tokens to evaluate on")
    widths = {t.shape[1] for t in out}
    if len(widths) != 1:
        raise ValueError(f"all rows must have the same length, got {sorted(widths)}")
    return torch.cat(out)


def corpus_rows(model, corpus, split: str, context_size: int, max_rows: int) -> torch.Tensor:
    """The first `max_rows` packed rows (BOS first) of a corpus split, tokenized with the model's tokenizer."""
    from saelab.data.packing import iter_packed_rows

    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer; pass `rows` of token ids instead")
    got = []
    for row in iter_packed_rows(corpus, model.tokenizer, context_size, split=split):
        got.append(row)
        if len(got) >= max_rows:
            break
    if not got:
        raise ValueError(f"corpus {corpus!r} split {split!r} gave no rows of {context_size} tokens")
    return torch.as_tensor(np.stack(got)).long()


def batches(rows: torch.Tensor, batch_rows: int, device: torch.device | str = "cpu",
            special_token_ids: Sequence[int] = (), exclude_special: bool = True, start: int = 0,
            stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row index, tokens [b, L] on `device`, special mask [b, L]) over rows[start:stop] in slices of
    batch_rows. With exclude_special=False the mask is all False."""
    n = rows.shape[0] if stop is None else min(stop, rows.shape[0])
    for i in range(start, n, batch_rows):
        tok = rows[i:min(i + batch_rows, n)].to(device)
        spec = special_mask(tok, special_token_ids) if exclude_special else torch.zeros_like(tok, dtype=torch.bool)
        yield i, tok, spec


# ================================================================================================ masks
def default_special_ids(model) -> list[int]:
    """The tokenizer's BOS, EOS and PAD ids (those that exist)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    ids = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(int(i) for i in ids if i is not None)


def special_mask(tokens: torch.Tensor, special_token_ids: Iterable[int] = (),
                 first_position: bool = True) -> torch.Tensor:
    """Bool [B, L], True at special positions: position 0 (if `first_position`) and any id in `special_token_ids`."""
    ids = torch.as_tensor(sorted(set(int(i) for i in special_token_ids)), dtype=tokens.dtype, device=tokens.device)
    mask = torch.isin(tokens, ids) if ids.numel() else torch.zeros_like(tokens, dtype=torch.bool)
    if first_position and tokens.shape[1]:
        mask[:, 0] = True
    return mask


def prediction_mask(special: torch.Tensor) -> torch.Tensor:
    """Bool [B, L-1]: the prediction at t (of token t+1) counts when neither t nor t+1 is special."""
    return ~special[:, :-1] & ~special[:, 1:]


def gather_rows(act: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Activation [B, L, *rest] → rows [n, prod(rest)] at the True positions of keep [B, L] (all when None)."""
    flat = act.reshape(*act.shape[:2], -1)
    return flat.reshape(-1, flat.shape[-1]) if keep is None else flat[keep]


def replace_rows(act: torch.Tensor, keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copy of act [B, L, ...] with the flattened rows at `keep` [B, L] set to `values` ([n, d] or [d])."""
    B, L = act.shape[:2]
    flat = act.reshape(B, L, -1).clone()
    flat[keep] = values.to(flat.dtype)
    return flat.reshape(act.shape)


# ================================================================================================ forwards
def capture(model, tokens: torch.Tensor, hooks: str | Sequence[str], stop_at_layer: int | None | str = "auto"
            ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward of `tokens` capturing the activation (the live tensor, [B, L, ...]) at each hook.

    stop_at_layer: "auto" stops as soon as every hook has fired (`stop_layer`; the output is then not logits; it is
    returned as None); None runs the whole forward and returns the logits; an int is passed to the forward.
    Runs under the caller's grad mode: inside torch.enable_grad() the activations are on the autograd graph.
    """
    from saelab.activations.capture import stop_layer

    names = [hooks] if isinstance(hooks, str) else list(hooks)
    stop = stop_layer(names, model.cfg.n_layers) if stop_at_layer == "auto" else stop_at_layer
    box: dict[str, torch.Tensor] = {}

    def make(name):
        def fn(act, hook):
            box[name] = act
            return act
        return fn

    with model.hooks(fwd_hooks=[(h, make(h)) for h in names]):  # not run_with_hooks: see `stop_layer`
        out = model(tokens, stop_at_layer=stop)
    missing = [h for h in names if h not in box]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire in the forward pass")
    return (out if stop is None else None), box


def run_with_replacement(model, tokens: torch.Tensor, hook_name: str, replacement: torch.Tensor) -> torch.Tensor:
    """Logits of a forward in which the activation at `hook_name` is replaced by `replacement` (same shape)."""
    def patch(act, hook):
        if act.shape != replacement.shape:
            raise RuntimeError(f"hook {hook_name!r}: activation {tuple(act.shape)} != replacement "
                               f"{tuple(replacement.shape)}")
        return replacement.to(act.dtype)

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, patch)])


# ================================================================================================ SAEs
def sae_reconstruct(sae, x: torch.Tensor, grad: torch.Tensor | None = None) -> tuple[SparseCode, torch.Tensor]:
    """(code, x̂) of raw activations x [n, d]: x̂ = sae.decode(sae.encode(x)) in raw space; with `grad` (the LM-loss
    gradient at x, [n, d]; a transcoder's: at its target) the code is sae.encode(x, grad=grad). A transcoder's x̂ is
    its output at its target hook, sae.decode(code, x) (a skip-transcoder's depends on x)."""
    code = sae.encode(x) if grad is None else sae.encode(x, grad=grad)
    return code, sae.decode(code, x) if target_hook(sae) else sae.decode(code)


def target_hook(sae) -> str:
    """The hook a transcoder writes (`sae.cfg.target_hook`), or "" for an SAE, which writes the hook it reads."""
    return getattr(getattr(sae, "cfg", None), "target_hook", "") or ""


# The two inference rules of an SAE whose encode takes the LM-loss gradient (g-SAE): its own, and what encode(x)
# does without a gradient. Evaluators report both, side by side, under these names.
GRAD_RULE, FALLBACK_RULE = "with gradient", "TopK fallback"


def infers_with_grad(sae) -> bool:
    """True when `sae.encode(x, grad=g)` selects latents with the LM-loss gradient g at the hook (a g-SAE with
    `inference_grads` and β > 0): evaluators then take that gradient and report the gradient-free rule beside it."""
    arch = getattr(sae, "arch", None)
    opt = getattr(arch, "opt", None)
    return bool(getattr(arch, "needs_grads", False) and getattr(opt, "inference_grads", False)
                and getattr(opt, "beta", 0) > 0)


def lm_loss_grad(model, tokens: torch.Tensor, hook_name: str, target_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B, L, V], activation at `hook_name` [B, L, ...], its gradient, same shape) of one full forward of
    `tokens` and one backward cut at the hook. The loss is the activation cache's (`saelab cache --with-grads`,
    `saelab.activations.capture.grad_loss`): next-token cross-entropy summed over the predicted positions, or only
    over the targets where `target_mask [B, L]` is True (padded rows). All three are detached."""
    from saelab.activations.capture import grad_loss

    box: dict[str, torch.Tensor] = {}

    def leaf(act, hook):  # a leaf here: the backward stops at the hook and no parameter gradient is formed
        box["act"] = act.detach().requires_grad_(True)
        return box["act"]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, leaf)])
        if "act" not in box:
            raise RuntimeError(f"hook {hook_name!r} did not fire in the forward pass")
        (grad,) = torch.autograd.grad(grad_loss(logits, tokens, target_mask), box["act"], allow_unused=True)
    act = box["act"].detach()
    return logits.detach(), act, torch.zeros_like(act) if grad is None else grad


def decoder_directions(sae) -> torch.Tensor:
    """[n_latents, d_out]: what one unit of each latent adds to the reconstruction in RAW activation space (d_out =
    d_in for an SAE; a transcoder's directions live at its target hook).

    `SparseAutoencoder.decoder_rows()`, except that a layer_norm SAE, which has no fixed raw direction (it is scaled
    by each token's norm), is refused here.
    """
    if sae.cfg.normalize == "layer_norm":
        from saelab.errors import ConfigError

        raise ConfigError("a layer_norm SAE has no fixed raw-space decoder direction (it depends on each token's "
                          "norm)", hint="use an SAE trained with normalize='scale' or 'none'")
    return sae.decoder_rows()


def check_sae_fits(model, sae) -> None:
    """Raise ModelError unless `sae` can be spliced into `model`: its hook exists, its width matches the hook's,
    and it was trained on this model (by name, when both record one)."""
    from saelab.errors import ModelError

    hook = sae.cfg.hook_name
    if hook not in model.hook_dict:
        raise ModelError(f"the SAE's hook {hook!r} does not exist in this model",
                         hint="load the model the SAE was trained on; `saelab hooks` lists valid names")
    trained_on = getattr(sae.cfg, "model_name", "") or ""
    this = getattr(model, "saelab_model_id", "") or ""
    if trained_on and this and trained_on != this:
        raise ModelError(f"the SAE was trained on model {trained_on!r}, not on {this!r}",
                         hint=f"load {trained_on!r} (--model {trained_on})")
    tok = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        _, acts = capture(model, tok, hook)
    width = gather_rows(acts[hook]).shape[-1]
    if width != sae.cfg.d_in:
        raise ModelError(f"the SAE expects d_in={sae.cfg.d_in} activations at {hook!r}, the model gives {width}",
                         hint="the SAE and the model do not belong together")
    target = target_hook(sae)
    if target:  # a transcoder writes another hook: it must exist and be d_out wide
        if target not in model.hook_dict:
            raise ModelError(f"the transcoder's target hook {target!r} does not exist in this model",
                             hint="load the model the transcoder was trained on; `saelab hooks` lists valid names")
        with torch.no_grad():
            _, acts = capture(model, tok, target)
        width = gather_rows(acts[target]).shape[-1]
        if width != sae.cfg.d_out:
            raise ModelError(f"the transcoder writes d_out={sae.cfg.d_out} activations at {target!r}, the model "
                             f"gives {width}", hint="the transcoder and the model do not belong together")


def add_latents(code: SparseCode, latents: torch.Tensor, amounts: torch.Tensor) -> SparseCode:
    """The code with extra (latent, value) entries appended per token: latents [n, m] or [m], amounts of the same
    shape (broadcast over tokens). Decoding sums repeated indices, so this adds `amount` to a latent's value."""
    from saelab.sae.code import SparseCode

    n = code.indices.shape[0]
    lat = torch.as_tensor(latents, device=code.indices.device).long()
    amt = torch.as_tensor(amounts, device=code.values.device, dtype=code.values.dtype)
    lat = lat.reshape(1, -1).expand(n, -1) if lat.dim() <= 1 else lat
    amt = amt.reshape(1, -1).expand(n, -1) if amt.dim() <= 1 else amt
    return SparseCode(torch.cat([code.indices, lat], 1), torch.cat([code.values, amt], 1))


@dataclass
class SpliceSite:
    """What the splice did at one hook during the most recent forward.

    positions: bool [B, L], the spliced positions (rows of x/code/x_hat/error are these positions in row-major
        order). x: the model's activation there [n, d] (detached). code: the SAE's code (values are an autograd
        leaf when track_grads). x_hat: decode(code) [n, d]. error: x − x_hat [n, d] (a leaf when track_grads;
        None when keep_error=False). After a backward pass (track_grads=True): `code.values.grad` is d/d(value)
        of each code entry, `error.grad` (= `x_hat.grad`) is d/d(activation) at the hook, and `latent_grads()`
        is the gradient for every latent, active or not ([n, n_latents], = x_hat.grad @ directionsᵀ).
    """

    hook_name: str
    sae: object
    shape: tuple = ()
    positions: torch.Tensor | None = None
    x: torch.Tensor | None = None
    code: SparseCode | None = None
    x_hat: torch.Tensor | None = None
    error: torch.Tensor | None = None
    n_forwards: int = 0
    extra: dict = field(default_factory=dict)  # free slot for edit functions (e.g. amounts they applied)

    def latent_grads(self) -> torch.Tensor:
        g = self.x_hat.grad if self.x_hat is not None and self.x_hat.grad is not None else None
        if g is None and self.error is not None:
            g = self.error.grad
        if g is None:
            raise RuntimeError("no gradient recorded: open the splice with track_grads=True and call backward()")
        return g.to(torch.float32) @ decoder_directions(self.sae).to(torch.float32).T

    def dense_code(self) -> torch.Tensor:
        """The code as a dense [n, n_latents] tensor (repeated indices summed)."""
        return self.code.to_dense(self.sae.cfg.n_latents)


Positions = torch.Tensor | str | None | Callable[[torch.Tensor], torch.Tensor]


def _positions_mask(positions: Positions, act: torch.Tensor) -> torch.Tensor:
    B, L = act.shape[:2]
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return torch.ones(B, L, dtype=torch.bool, device=act.device)
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions must be None/'all', 'last', a bool [B, L] mask or a callable, got "
                             f"{positions!r}")
        mask = torch.zeros(B, L, dtype=torch.bool, device=act.device)
        mask[:, -1] = True
        return mask
    mask = positions(act) if callable(positions) else positions
    mask = mask.to(act.device, torch.bool)
    if mask.shape != (B, L):
        raise RuntimeError(f"splice positions mask is {tuple(mask.shape)}, the activation is [B, L] = [{B}, {L}]")
    return mask


@contextmanager
def splice(model, saes, keep_error: bool = True, positions: Positions | dict[str, Positions] = None,
           edit: Callable[[SpliceSite], None] | None = None, track_grads: bool = False):
    """While open, every forward of `model` runs with each SAE spliced in at its hook (`sae.cfg.hook_name`).

    At the spliced positions the activation x becomes decode(code) + error, where code = sae.encode(x) and
    error = x − decode(encode(x)) when keep_error (then the forward is numerically the clean forward, up to
    float rounding, until `edit` changes something), or nothing when keep_error=False (the SAE's reconstruction
    replaces x: what core metrics' CE_sae measures). Other positions are untouched.

    saes: one SAE or a list (one per hook; each hook at most once).
    positions: None/"all" (every position of every forward), "last" (the last position of each forward: during
        KV-cached generation every new token), a bool [B, L] mask, a callable act -> mask, or a dict per hook.
    edit(site): called after encoding, before decoding; may replace `site.code` (e.g. `add_latents`, zeroing a
        latent, values patched in from another run) and `site.error`; the output is decode(site.code) + site.error.
    track_grads: make code values and the error autograd leaves (call the forward under torch.enable_grad and
        backward from any scalar of the logits); the graph is cut at the hook (nothing flows upstream of it).

    Yields {hook_name: SpliceSite}, refreshed on every forward (so it describes the most recent one).
    """
    sae_list = list(saes) if isinstance(saes, (list, tuple)) else [saes]
    sites: dict[str, SpliceSite] = {}
    for sae in sae_list:
        name = sae.cfg.hook_name
        if not name:
            raise ValueError("an SAE with an empty cfg.hook_name cannot be spliced")
        if name in sites:
            raise ValueError(f"two SAEs at hook {name!r}; splice at most one per hook")
        sites[name] = SpliceSite(hook_name=name, sae=sae)

    def make(site: SpliceSite):
        pos = positions.get(site.hook_name) if isinstance(positions, dict) else positions

        def fn(act, hook):
            B, L = act.shape[:2]
            mask = _positions_mask(pos, act)
            x = gather_rows(act, mask).detach()
            sae = site.sae
            code = sae.encode(x)
            if track_grads:
                from saelab.sae.code import SparseCode

                code = SparseCode(code.indices, code.values.detach().clone().requires_grad_(True))
            site.shape, site.positions, site.x, site.code = tuple(act.shape), mask, x, code
            with torch.enable_grad() if track_grads else torch.no_grad():
                x_hat0 = sae.decode(code)
            error = (x - x_hat0).detach() if keep_error else None
            if track_grads and error is not None:
                error = error.clone().requires_grad_(True)
            site.error = error
            if edit is not None:
                edit(site)
            with torch.enable_grad() if track_grads else torch.no_grad():
                x_hat = sae.decode(site.code) if site.code is not code else x_hat0
                if track_grads:
                    x_hat.retain_grad()
                out = x_hat if site.error is None else x_hat + site.error
                site.x_hat = x_hat
                new = act.reshape(B, L, -1)
                new = new.clone() if not track_grads else new.detach().clone()
                if track_grads:
                    # rows outside the mask keep the model's activation; spliced rows carry the graph
                    new = new.masked_scatter(mask.unsqueeze(-1), out.to(new.dtype)) if not bool(mask.all()) \
                        else out.to(new.dtype).reshape(B, L, -1)
                else:
                    new[mask] = out.to(new.dtype)
            site.n_forwards += 1
            return new.reshape(act.shape)
        return fn

    with model.hooks(fwd_hooks=[(name, make(site)) for name, site in sites.items()]):
        yield sites


__all__ = ["as_rows", "corpus_rows", "batches", "default_special_ids", "special_mask",
           "prediction_mask", "gather_rows", "replace_rows", "capture", "run_with_replacement",
           "sae_reconstruct", "target_hook", "GRAD_RULE", "FALLBACK_RULE", "infers_with_grad", "lm_loss_grad",
           "decoder_directions", "check_sae_fits", "add_latents", "SpliceSite", "splice"]
