"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope's architecture): latent i is active where
its pre-activation exceeds its own threshold θ_i, with the pre-activation as its value,

    f_i = pre_i · 1[pre_i > θ_i],   θ_i = exp(log θ_i),   x̂ = f·W_dec + b_dec.

The same architecture loads SAELens's JumpReLU folders, and with them what SAELens saves as JumpReLU (BatchTopK,
Matryoshka) and its ReLU "standard" SAEs (θ = 0). SAELens zeroes pre-activations at or below max(θ, 0), so a θ ≤ 0
in a file is θ = 0 here (log θ = −inf).

log θ is a float32 parameter whatever the SAE's dtype: in bfloat16 an Adam step on a threshold near 1 rounds away
(SAELens PR #728 measured 0.0016 of movement against fp32's 0.0123 over 200 steps). The log keeps θ > 0; it moves θ
by a fraction of itself per step, which froze SAELens's thresholds started at 0.001 (their #718), so θ starts where
the SAE is already sparse instead: at the first batch's cut-off for a mean L0 of `target_l0` (or k).

Training. The step 1[pre > θ] has no gradient, so θ gets the paper's straight-through estimators, pseudo-derivatives
with the rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε:

    ∂f_i/∂θ_i = −(θ_i/ε)·K((pre_i − θ_i)/ε),   ∂1[pre_i > θ_i]/∂θ_i = −(1/ε)·K((pre_i − θ_i)/ε),
    ∂f_i/∂pre_i = 1[pre_i > θ_i]

Only pre-activations within ε/2 of θ move it, so a step's code holds every latent with pre > θ − ε/2 (a
`relu.Support`, packed or dense as a ReLU SAE's): those at or below θ have value 0, so they are inactive for every
"active = value ≠ 0" count and read no decoder row, but the sparse decoder still gives them the gradient of their
value (`gather_dot`), which the estimator turns into θ's. Inference keeps pre > θ only.

Two recipes:
* "deepmind" (the paper): loss = FVU + λ·E[Σ_i 1[pre_i > θ_i]] (+ AuxK as every saelab architecture; aux_coef 0 turns
  it off), unit-norm decoder rows, the estimator reaches θ only;
* "anthropic" (Circuits Updates, January 2025): loss = FVU + λ·E[Σ_i tanh(c·f_i·‖W_dec,i‖)] + the pre-activation
  loss λ_P·E[Σ_i ReLU(θ_i − pre_i)·‖W_dec,i‖] / E‖x̃ − E x̃‖² over the dead latents (SAELens's choice; Anthropic
  applies it to every latent, which would need the dense backward of the whole encoder), decoder rows with free
  norms, and the estimator's gradient reaching the pre-activations too (∂/∂pre = −∂/∂θ), so the encoder also learns
  to be sparse. No AuxK (the pre-activation loss is the recipe's remedy for dead latents).

λ is in FVU per active latent: the loss is FVU (squared error over the fixed E‖x̃ − E x̃‖²) plus λ per active latent,
so at the optimum a latent fires where firing saves at least λ of FVU, whatever the hook's scale or width. It rises
linearly from 0 over the first `l0_warmup_fraction` of the steps. `target_l0` steers it instead, a PI controller on
log λ: with e = log(L0 / target) after each step (L0 the global batch's mean), λ = l0_coef·exp(Σ l0_adapt_rate·e +
e_last), so λ grows while L0 is above the target and shrinks below it; no warm-up then. SAELens's coefficient
saturates (its #719: the L0 term's gradient on θ is ~1000× the reconstruction's, so any λ above ~0.1 drives θ up at
Adam's full speed); in FVU units the two balance near the default, and the controller removes the choice altogether.
Adam moves log θ by about its learning rate per step whatever the gradient, so the thresholds train at
`threshold_lr_scale` times the SAE's learning rate: at 1 a 2M-token run could move them by a tenth of themselves.

metrics.jsonl gets `sparsity` (the penalty before λ: the mean L0, or the tanh sum), `l0_coef` (λ this step),
`threshold_shift` (mean |log θ − log θ at init| over the latents: how far the thresholds have moved) and, in the
anthropic recipe, `pre_act`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from saelab.distributed import rank_world
from saelab.errors import ConfigError
from saelab.sae.architectures import Architecture, fvu, global_cut, threshold_indices
from saelab.sae.code import SparseCode
from saelab.sae.relu import Support
from saelab.settings import setting

RECIPES = ("deepmind", "anthropic")
INIT_ROWS = 4096  # rows of the first batch that place the initial thresholds (bounds the [rows, n] pre-activations)
MIN_INIT_THRESHOLD = 1e-3  # a floor for the data-placed θ (its cut-off can be ≤ 0 on a tiny or odd sample)
MAX_LOG_SCALE = math.log(1e4)  # target_l0's controller keeps λ within 10^±4 of l0_coef
PROPORTIONAL = 1.0  # target_l0's controller: λ also carries (L0 / target)^this of the last step


@dataclass
class JumpReLUOptions:
    recipe: str = setting("deepmind", "deepmind: L0 penalty, estimator to θ only, unit-norm decoder (Rajamanoharan "
                                      "et al. 2024); anthropic: tanh penalty on f·‖W_dec,i‖, estimator to the "
                                      "encoder too, free decoder norms, pre-activation loss (Anthropic, Jan 2025)",
                          choices=RECIPES)
    l0_coef: float = setting(3e-3, "λ, in FVU per active latent: a latent fires where it saves at least λ of FVU "
                                   "(larger λ, lower L0; on the reference model's middle residual stream, 512 latents "
                                   "after 100 steps of 1024 tokens, 1e-3, 3e-3, 1e-2, 3e-2 gave L0 70, 45, 18, 14)")
    l0_warmup_fraction: float = setting(0.05, "λ rises linearly from 0 over this fraction of the training steps "
                                              "(not with --target-l0)")
    target_l0: float = setting(0.0, "steer λ each step so that the mean L0 approaches this many latents per token "
                                    "(0: a fixed λ)")
    l0_adapt_rate: float = setting(0.05, "with --target-l0: log λ accumulates this × log(L0 / target) after each "
                                         "step (and carries the last step's log(L0 / target) as is)")
    bandwidth: float = setting(0.1, "ε of the rectangle kernel of the threshold's straight-through estimator, in the "
                                    "units of the normalised pre-activations, E‖x̃‖² = d_in (the paper's 0.001 was for "
                                    "E‖x‖² = 1); only pre-activations within ε/2 of θ move it: on the reference model "
                                    "at λ 1e-2 thresholds moved 0.23, 0.42, 0.48, 0.47 (mean |Δ log θ|) in 100 steps "
                                    "at 0.001, 0.01, 0.1, 0.3")
    threshold_lr_scale: float = setting(10.0, "log θ trains at the learning rate times this (Adam moves log θ by "
                                              "about the learning rate per step: at 1 the thresholds of the same run "
                                              "moved 0.07 instead of 0.48, and L0 stayed at 35 instead of 18)")
    init_threshold: float = setting(0.0, "initial θ of every latent (0: the first batch's cut-off for a mean L0 of "
                                         "target_l0, or of k)")
    tanh_scale: float = setting(4.0, "anthropic recipe: c in tanh(c·f·‖W_dec,i‖)")
    pre_act_coef: float = setting(3e-6, "anthropic recipe: λ_P of the pre-activation loss on dead latents, in "
                                        "Anthropic's units (their loss over saelab's fixed FVU denominator)")

    def __post_init__(self):
        from saelab.settings import check

        check(self.recipe in RECIPES, "recipe", f"must be one of {RECIPES}, got {self.recipe!r}")
        check(self.l0_coef >= 0, "l0_coef", f"must be >= 0, got {self.l0_coef}")
        check(0 <= self.l0_warmup_fraction <= 1, "l0_warmup_fraction",
              f"must be in [0, 1], got {self.l0_warmup_fraction}")
        check(self.target_l0 >= 0, "target_l0", f"must be >= 0 (0: off), got {self.target_l0}")
        check(self.l0_adapt_rate >= 0, "l0_adapt_rate", f"must be >= 0, got {self.l0_adapt_rate}")
        check(self.target_l0 == 0 or self.l0_coef > 0, "l0_coef", "must be > 0 with target_l0 (λ is steered "
                                                                   "by a factor)")
        check(self.bandwidth > 0, "bandwidth", f"must be > 0, got {self.bandwidth}")
        check(self.threshold_lr_scale > 0, "threshold_lr_scale", f"must be > 0, got {self.threshold_lr_scale}")
        check(self.init_threshold >= 0, "init_threshold", f"must be >= 0 (0: from the data), got "
                                                          f"{self.init_threshold}")
        check(self.tanh_scale > 0, "tanh_scale", f"must be > 0, got {self.tanh_scale}")
        check(self.pre_act_coef >= 0, "pre_act_coef", f"must be >= 0, got {self.pre_act_coef}")


class JumpStep(torch.autograd.Function):
    """(f, step) = (pre·1[pre > θ], 1[pre > θ]) on a support's slots, with the rectangle-kernel pseudo-derivatives of
    the module docstring. `pre` is [B, K] at `indices` (or a dense [B, n] with indices None); θ [n] is float32 and so
    is its gradient, summed over the slots of each latent. With `to_input` the estimator's gradient also reaches
    `pre` (∂/∂pre = −∂/∂θ)."""

    @staticmethod
    def forward(ctx, pre, theta, indices, eps: float, to_input: bool):
        th = theta if indices is None else theta[indices]
        diff = pre.float() - th
        on = diff > 0
        ctx.save_for_backward(diff, on, th, indices)
        ctx.eps, ctx.to_input, ctx.n = eps, to_input, theta.shape[0]
        return pre * on, on.to(pre.dtype)

    @staticmethod
    def backward(ctx, g_f, g_step):
        diff, on, th, indices = ctx.saved_tensors
        eps = ctx.eps
        window = diff.abs() < eps / 2
        g_th = torch.where(window, -(th / eps) * g_f.float() - g_step.float() / eps, 0.0)
        g_pre = g_f * on
        if ctx.to_input:
            g_pre = g_pre - g_th.to(g_pre.dtype)
        if indices is None:
            g_theta = g_th.sum(0)
        else:
            g_theta = torch.zeros(ctx.n, dtype=torch.float32, device=g_th.device)
            g_theta.index_add_(0, indices.reshape(-1), g_th.reshape(-1))
        return g_pre, g_theta, None, None, None


class JumpReLU(Architecture):
    name = "jumprelu"
    help = ("JumpReLU (Rajamanoharan et al. 2024): per-latent learned thresholds with straight-through estimators, "
            "an L0 penalty (or Anthropic's Jan 2025 tanh recipe), --target-l0; also loads SAELens JumpReLU / "
            "BatchTopK / ReLU SAEs")
    Options = JumpReLUOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.anthropic = self.opt.recipe == "anthropic"
        self.unit_decoder = not self.anthropic
        self.warm = 1.0  # λ's warm-up factor (begin_step); 1 outside the trainer
        self.support: Support | None = None  # code_train's, for losses of the same step
        self.step_values: torch.Tensor | None = None  # the step's code values in the support's layout
        self.gate: torch.Tensor | None = None  # 1[pre > θ] on the support, with θ's estimator

    @classmethod
    def check_config(cls, cfg) -> None:
        target = float((cfg.options or {}).get("target_l0") or 0)
        if target > cfg.n_latents:
            raise ConfigError(f"target_l0: must be <= n_latents ({cfg.n_latents}), got {target:g}",
                              hint="a token cannot use more latents than the SAE has: lower --target-l0 or widen "
                                   "the SAE (--n-latents)")

    # ---------------------------------------------------------------------------------------------- state
    def init_state(self, sae) -> None:
        dev = sae.W_dec.device
        sae.register_parameter("log_threshold", nn.Parameter(torch.zeros(self.cfg.n_latents, device=dev)))
        sae.register_buffer("log_threshold_init", torch.zeros((), device=dev))  # for threshold_shift
        # target_l0's controller: λ = l0_coef·exp(l0_log_scale + PROPORTIONAL·l0_error), l0_error = log(L0 / target)
        sae.register_buffer("l0_log_scale", torch.zeros((), device=dev))
        sae.register_buffer("l0_error", torch.zeros((), device=dev))

    def threshold(self, sae) -> torch.Tensor:
        """θ [n], float32 (differentiable)."""
        return sae.log_threshold.exp()

    def set_threshold(self, sae, theta: torch.Tensor) -> None:
        """θ [n] (values ≤ 0: never gated beyond the ReLU, log θ = −inf), as the starting point of threshold_shift."""
        with torch.no_grad():
            sae.log_threshold.copy_(theta.float().clamp_min(0).log())
            finite = sae.log_threshold[torch.isfinite(sae.log_threshold)]
            sae.log_threshold_init.fill_(float(finite.mean()) if finite.numel() else 0.0)

    @torch.no_grad()
    def init_parameters(self, sae) -> None:
        self.set_threshold(sae, torch.full((self.cfg.n_latents,), self.opt.init_threshold or 1.0))
        sae.l0_log_scale.zero_()
        sae.l0_error.zero_()

    @torch.no_grad()
    def init_from_data(self, sae, x_norm: torch.Tensor, y_norm: torch.Tensor) -> None:
        """θ of every latent at the cut-off that gives the sample (its first INIT_ROWS rows) a mean L0 of target_l0
        (or k), so the SAE starts as sparse as it is meant to end; then the encoder (and θ with it, the same code) is
        scaled so that this code's reconstruction has the least-squares scale on the sample. The tied init's
        reconstruction overshoots (FVU ≈ 1.6 on the reference model), and shrinking it in training would push the
        pre-activations below their thresholds: L0 fell from 32 to 8 in 60 steps, where TopK keeps its k."""
        if self.opt.init_threshold:
            return
        x_c = x_norm[:INIT_ROWS].to(sae.W_dec.dtype) - sae.b_pre
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        want = max(1, round((self.opt.target_l0 or self.cfg.k) * pre.shape[0]))
        cut = max(float(global_cut(pre.reshape(-1).float(), min(want, pre.numel()), 1)), MIN_INIT_THRESHOLD)
        x_hat = (pre * (pre > cut)) @ sae.W_dec
        y_c = y_norm[:INIT_ROWS].to(sae.W_dec.dtype) - sae.b_dec  # what the code's x̂ should be (x_c for an SAE)
        scale = float((y_c * x_hat).sum() / x_hat.pow(2).sum().clamp_min(1e-12))
        if scale > 0:
            sae.W_enc.mul_(scale)
            sae.b_enc.mul_(scale)
            cut *= scale
        self.set_threshold(sae, torch.full((self.cfg.n_latents,), cut))

    def lr_scales(self) -> dict[str, float]:
        return {"log_threshold": self.opt.threshold_lr_scale} if self.opt.threshold_lr_scale != 1 else {}

    def begin_step(self, step: int, steps: int) -> None:
        warm = self.opt.l0_warmup_fraction * steps
        self.warm = 1.0 if self.opt.target_l0 or warm <= 0 else min(1.0, (step + 1) / warm)

    def l0_coef(self, sae) -> torch.Tensor:
        """λ at this step."""
        return self.opt.l0_coef * self.warm * (sae.l0_log_scale + PROPORTIONAL * sae.l0_error).exp()

    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        """target_l0: a PI controller on log λ: the error e = log(L0 / target) (L0 the global batch's mean) enters
        λ as is, and accumulates l0_adapt_rate·e per step."""
        if not self.opt.target_l0:
            return
        l0 = out.code.l0().float().mean().reshape(1)
        if rank_world()[1] > 1:
            dist.all_reduce(l0)
            l0 /= rank_world()[1]
        err = torch.log(l0.clamp_min(1e-3) / self.opt.target_l0)[0]
        sae.l0_error.copy_(err)
        sae.l0_log_scale.add_(self.opt.l0_adapt_rate * err).clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)

    # ---------------------------------------------------------------------------------------------- codes
    def select_inference(self, sae, pre, grad):
        return threshold_indices(pre, self.threshold(sae).detach())

    def select(self, sae, pre, grad, k):
        return self.select_inference(sae, pre, grad)

    def values(self, pre_selected):
        return pre_selected  # selected entries exceed θ > 0 (padding is masked by the caller)

    def code_train(self, sae, x_c, pre, grad, k=None) -> SparseCode:
        theta = self.threshold(sae)
        self.support = s = Support.above(pre, theta.detach() - self.opt.bandwidth / 2)
        f, gate = JumpStep.apply(s.preacts(sae, x_c, pre), theta, s.indices, self.opt.bandwidth, self.anthropic)
        self.gate, self.step_values = s.mask(gate), s.mask(f)
        return s.code(self.step_values)

    # ---------------------------------------------------------------------------------------------- losses
    def losses(self, sae, x_norm, x_c, pre, code, grad, dead_mask):
        s, gate, values = self.support, self.gate, self.step_values
        self.support = self.gate = self.step_values = None
        x_hat = s.decode(values, sae.W_dec) + sae.b_dec
        err = x_norm - x_hat
        losses = {"fvu": fvu(err, sae.loss_normalizer)}
        if self.anthropic:
            norms = s.per_latent(sae.W_dec.norm(dim=1))
            losses["sparsity"] = s.token_mean(torch.tanh(self.opt.tanh_scale * values * norms))
        else:
            losses["sparsity"] = s.token_mean(gate)
        losses["l0_coef"] = self.l0_coef(sae)
        losses["loss"] = losses["fvu"] + losses["l0_coef"] * losses["sparsity"]
        if self.anthropic:
            pre_act = self.pre_act_loss(sae, x_c, pre, dead_mask)
            if pre_act is not None:
                losses["pre_act"] = pre_act
                losses["loss"] = losses["loss"] + self.opt.pre_act_coef * pre_act
        else:
            losses["loss"] = losses["loss"] + self.aux_losses(sae, x_c, pre, err, dead_mask, losses)
        with torch.no_grad():
            losses["threshold_shift"] = (sae.log_threshold - sae.log_threshold_init).abs().mean()
        return x_hat, losses

    def pre_act_loss(self, sae, x_c, pre, dead_mask) -> torch.Tensor | None:
        """E[Σ_{dead i} ReLU(θ_i − pre_i)·‖W_dec,i‖] / E‖x̃ − E x̃‖²: pulls dead latents' pre-activations up to their
        thresholds (and their thresholds down). A small GEMM over the dead columns only."""
        if dead_mask is None:
            return None
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:
            return None
        rows = F.embedding(dead, sae.W_enc.T)  # [n_dead, d]; its backward is a row index_add
        pre_dead = torch.addmm(F.embedding(dead, sae.b_enc.unsqueeze(1)).squeeze(1), x_c, rows.T)
        gap = (self.threshold(sae)[dead] - pre_dead.float()).relu()
        return (gap * sae.W_dec.norm(dim=1)[dead].float()).sum(-1).mean() / sae.loss_normalizer

    # ---------------------------------------------------------------------------------------------- export
    def saelens_export(self, sae) -> dict:
        return {"architecture": "jumprelu", "cfg": {}, "tensors": {"threshold": self.threshold(sae).detach()}}

    def load_tensors(self, sae, tensors: dict) -> None:
        self.set_threshold(sae, tensors["threshold"])


ARCHITECTURE = JumpReLU
