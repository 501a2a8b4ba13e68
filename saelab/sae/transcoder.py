"""Transcoders and skip-transcoders: the SAE's encoder reads one hook (`hook_name`, e.g. blocks.2.hook_mlp_in), its
decoder writes another (`target_hook`, e.g. blocks.2.hook_mlp_out), and the loss is the reconstruction of the target's
activations of the same tokens (Dunefsky et al. 2024; the skip-transcoder's linear term: Paulo et al. 2025).

    x̃ = s_in·x,  ỹ = s_out·y            each side its own fixed scale (E‖x̃‖² = d_in, E‖ỹ‖² = d_out), as an SAE's
    pre = (x̃ − b_in)·W_enc + b_enc       the architecture selects and codes exactly as it does for an SAE
    ỹ̂ = f·W_dec + b_dec [+ x̃·W_skipᵀ]    W_dec [n, d_out], b_dec [d_out]; --skip: W_skip [d_out, d_in], zero at init
    loss: the architecture's own, with ỹ − x̃·W_skipᵀ as what the decoder must reproduce; FVU = E‖ỹ − ỹ̂‖² / E‖ỹ − E ỹ‖²

An SAE's b_dec both centres its input and offsets its output. A transcoder's input and output are different spaces,
so the roles are two parameters: b_in [d_in] (the geometric median of x̃ at init, as an SAE's b_dec) and b_dec [d_out]
(that of ỹ). With target = input (and no skip) a transcoder is therefore the SAE with this one bias untied: the same
parameters at init (the encoder is the decoder's transpose wherever d_in = d_out), the same outputs and losses, and
gradients that split the SAE's b_dec gradient between b_in and b_dec (tests/test_transcoder.py).

Normalisation: "scale" (each side's factor folded into the weights at save) or "none". The per-token modes
(layer_norm, constant_norm_rescale) would undo the output with the *target's* per-token statistics, which a
transcoder does not have at inference (it sees only the input); refused, as SAELens's transcoders do not undo them.

Architectures: every one transcodes except matching pursuit, whose encoder is its own dictionary (it explains its
input by its decoder rows, so it cannot write another space). g-SAE (gtopk) ranks latents by |W_dec g|, the effect of
a latent's decoder row on the LM loss, so its g is the LM-loss gradient at the *target* hook (where the decoder
writes): the cache's gradients of the target hook, and evaluators take the gradient there.

The functions here receive the SAE (`saelab.sae.sae.SparseAutoencoder`, which calls them) and never import it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from saelab.errors import ConfigError

NORMALIZATIONS = ("scale", "none")  # a transcoder's (see the module docstring)


def check_transcoder_config(cfg) -> None:
    """`SAEConfig`'s transcoder checks (when it is built): --skip needs a target; the architecture and normalisation
    must be able to transcode."""
    if not cfg.target_hook:
        if cfg.skip:
            raise ConfigError("sae.skip: a skip-transcoder needs a target hook; the linear term maps the input hook to "
                              "another one", hint="add --target-hook HOOK (e.g. the block's hook_mlp_out), or drop "
                                                  "--skip to train an SAE")
        if cfg.d_out:
            raise ConfigError(f"sae.d_out: {cfg.d_out}, but there is no target hook (an SAE's output is its input)",
                              hint="drop d_out, or set target_hook")
        return
    from saelab.sae.architectures import get_architecture

    refusal = get_architecture(cfg.architecture).transcoder_refusal
    if refusal:
        raise ConfigError(f"sae.target_hook: a {cfg.architecture} SAE cannot be a transcoder: {refusal}",
                          hint="choose another --arch (topk, batchtopk, relu, jumprelu, ...), or drop --target-hook")
    if cfg.normalize not in NORMALIZATIONS:
        raise ConfigError(f"sae.normalize: a transcoder normalises with 'scale' or 'none', not {cfg.normalize!r}: a "
                          f"per-token normalisation would undo its output with the target's own statistics, which it "
                          f"does not see at inference", hint="use --normalize scale (the default)")


# ------------------------------------------------------------------------------------------------------ the module
def init_state(sae) -> None:
    """Register a transcoder's own parameters on `sae`: b_in [d_in] and, for a skip-transcoder, W_skip [d_out, d_in]
    (SAELens's layout)."""
    cfg = sae.cfg
    if not cfg.target_hook:
        return
    kw = {"dtype": sae.W_dec.dtype, "device": sae.W_dec.device}
    sae.b_in = nn.Parameter(torch.zeros(cfg.d_in, **kw))
    if cfg.skip:
        sae.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, **kw))


@torch.no_grad()
def reset(sae) -> None:
    """A transcoder's own parameters at init: zero (the skip term zero-initialised, as Paulo et al. do)."""
    for name in ("b_in", "W_skip"):
        if hasattr(sae, name):
            getattr(sae, name).zero_()


def check_target(sae, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The target rows [B, d_out] of the input rows x, in the SAE's dtype."""
    d_out = sae.cfg.d_out
    if y.dim() != 2 or y.shape[1] != d_out or y.shape[0] != x.shape[0]:
        raise ValueError(f"a transcoder's target must be [batch, {d_out}] (d_out of {sae.cfg.target_hook!r}) with one "
                         f"row per input row ({x.shape[0]}), got {tuple(y.shape)}")
    return y.to(sae.W_dec.dtype)


def normalize_target(sae, y: torch.Tensor) -> torch.Tensor:
    cfg = sae.cfg
    return y * cfg.target_scale if cfg.normalize == "scale" and cfg.target_scale != 1.0 else y


def skip_term(sae, x_norm: torch.Tensor | None) -> torch.Tensor | None:
    """x̃·W_skipᵀ [B, d_out] in the target's normalised space, or None (no skip term)."""
    if not sae.cfg.skip:
        return None
    if x_norm is None:
        raise ValueError("a skip-transcoder's output depends on its input: decode(code, x) with the input rows x the "
                         "code was made from")
    return x_norm @ sae.W_skip.T


def reconstruction_goal(sae, x_norm: torch.Tensor, target: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(what the decoder must reproduce, in normalised space; the skip term added to its output, or None). An SAE's
    goal is its own input; a transcoder's the target minus the skip term (whose gradient reaches W_skip through it)."""
    if not sae.cfg.target_hook:
        if target is not None:
            raise ValueError("an SAE reconstructs its own input; target= is for transcoders (SAEConfig.target_hook)")
        return x_norm, None
    if target is None:
        raise ValueError(f"a transcoder trains against its target hook's activations ({sae.cfg.target_hook!r}): call "
                         f"it as sae(x, target=y)")
    y = normalize_target(sae, check_target(sae, target, x_norm))
    skip = skip_term(sae, x_norm)
    return (y if skip is None else y - skip), skip


@torch.no_grad()
def init_target(sae, y: torch.Tensor | None, mean_sq_norm: float | None, var_total: float | None,
                samples: int) -> torch.Tensor:
    """A transcoder's data-dependent init of its output side, as `init_from_data_` does an SAE's from its input: the
    target's fixed scale (E‖ỹ‖² = d_out) and the loss normaliser E‖ỹ − E ỹ‖² (`mean_sq_norm` / `var_total`, raw
    space, override the sample's). Returns the normalised sample ỹ (its first `samples` rows)."""
    if y is None:
        raise ValueError(f"a transcoder's init needs a sample of its target's activations ({sae.cfg.target_hook!r}): "
                         f"init_from_data_(x, target=y)")
    y = y.float()
    msn = float(mean_sq_norm) if mean_sq_norm is not None else float(y.pow(2).sum(-1).mean())
    var = float(var_total) if var_total is not None else float((y - y.mean(0)).pow(2).sum(-1).mean())
    if sae.cfg.normalize == "scale":
        sae.cfg.target_scale = (sae.cfg.d_out / max(msn, 1e-12)) ** 0.5
    sae.loss_normalizer.fill_(var * (sae.cfg.target_scale ** 2 if sae.cfg.normalize == "scale" else 1.0))
    return normalize_target(sae, y[:samples])


# ------------------------------------------------------------------------------------------------------ SAELens
# SAELens 6.54's transcoder classes: a ReLU ("standard") or JumpReLU encoder, with or without W_skip. A transcoder
# of another architecture is saved as "<its SAELens name>_[skip_]transcoder" (e.g. topk_transcoder), which saelab
# loads and SAELens 6.54 refuses by name (it has no such class) rather than compute something else.
SAELENS_LOADS = ("standard", "jumprelu")


def saelens_architecture(sae_architecture: str, skip: bool) -> str:
    """The SAELens architecture name of a transcoder whose encoder SAELens would call `sae_architecture`:
    standard → transcoder, skip_transcoder; jumprelu → jumprelu_transcoder, jumprelu_skip_transcoder."""
    prefix = "" if sae_architecture == "standard" else f"{sae_architecture}_"
    return f"{prefix}{'skip_' if skip else ''}transcoder"


def from_saelens_architecture(name: str) -> tuple[str, bool] | None:
    """(the SAELens SAE architecture of its encoder, skip) of one of SAELens's transcoder classes; None otherwise."""
    for sae_architecture in SAELENS_LOADS:
        for skip in (False, True):
            if name == saelens_architecture(sae_architecture, skip):
                return sae_architecture, skip
    return None


@torch.no_grad()
def fold_input_bias(sae, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (the SAE's, normalised space) with b_in folded into the encoder biases, for SAELens's layout, which
    has no b_in: pre = (x̃ − b_in)·W_enc + b_enc = x̃·W_enc + (b_enc − b_in·W_enc); Gated's magnitude bias likewise
    through its r_mag tie (b_mag − exp(r_mag)·(b_in·W_enc)). Every code is unchanged."""
    shift = sae.b_in.detach() @ sae.W_enc.detach()
    out = dict(tensors)
    if "b_enc" in tensors:
        out["b_enc"] = (tensors["b_enc"] - shift).contiguous()
    if "b_mag" in tensors:
        out["b_mag"] = (tensors["b_mag"] - sae.r_mag.detach().exp() * shift).contiguous()
    return out
