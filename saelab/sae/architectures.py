"""The architecture seam: what an SAE architecture owns, and the one registry of them.

`SparseAutoencoder` holds the parameters (W_enc, b_enc, W_dec, b_dec), the input normalisation and save/load. An
`Architecture` owns everything that differs between TopK-family SAEs:

* its options: a small dataclass (`Options`) of `saelab.settings.setting` fields, stored in `SAEConfig.options` and
  checked there (`saelab.config.check_options`), listed by `saelab train --arch A --help`;
* `select(...)`: which latents a token uses in training (TopK: per token; BatchTopK: over the batch; g-SAE: with
  the LM-loss gradient); `select_inference(...)`: the batch-independent rule (e.g. a learned threshold);
* `losses(...)`: the training objective (default: FVU + AuxK; Matryoshka adds per-prefix losses);
* state: buffers it registers on the SAE module (`init_state`), updated by `after_step` (e.g. a threshold EMA), so
  they are in the SAE's `state_dict()` and in every checkpoint;
* `saelens_export(...)`: how SAELens should see it (BatchTopK is saved for inference as JumpReLU + `threshold`).

Each architecture is one small file (`topk.py`, `batchtopk.py`, `matryoshka.py`, `gradient_topk.py`,
`jumprelu.py`, `relu.py`, `gated.py`, ...) that overrides only what differs from TopK. Architectures receive the SAE as an argument and never
import it (the SAE imports them).

Conventions: `pre` is the dense pre-activation [B, n] computed without autograd (the step's one dense GEMM);
`x_c = x̃ − b_pre` the centred normalised input (b_pre: an SAE's b_dec, a transcoder's b_in); `x_norm` in `losses`
what the decoder must reproduce (an SAE's x̃; a transcoder's normalised target, less its skip term:
`saelab.sae.transcoder`); `grad` the LM-loss gradient at the hook (a transcoder's: at its target) in normalised space,
or None.
A selection is `(indices [B, K], valid [B, K] bool or None)`; padded slots (valid False) get value 0 and no gradient,
so every kernel consumes variable-k codes as they are. "Active" always means value != 0.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from saelab.distributed import rank_world
from saelab.errors import ConfigError
from saelab.kernels import encoder_values, sparse_decode
from saelab.kernels.topk_stream import Key, abs_key, block_preacts, streaming_topk
from saelab.sae.code import SparseCode
from saelab.sae.latent_shard import batch_count, reconstruct, shard_of
from saelab.settings import setting

# files that define an architecture (`ARCHITECTURE`, or a tuple `ARCHITECTURES` for a file with several)
MODULES = ("topk", "batchtopk", "matryoshka", "gradient_topk", "jumprelu", "matching_pursuit", "choice", "relu",
           "gated", "abstopk")


@dataclass
class ThresholdOptions:
    """The options of every architecture that infers with a learned threshold (BatchTopK, Matryoshka, mutual and
    feature choice): the threshold's EMA during training and its calibration after the last step."""

    threshold_momentum: float = setting(0.99, "EMA momentum of the inference threshold θ (dictionary_learning uses "
                                              "0.999 over 10^5 steps; 0.99 averages the last ~100 steps)")
    threshold_start_step: int = setting(0, "first step whose batch minimum enters θ")
    calibration_tokens: int = setting(65_536, "after training, fit the inference threshold(s) exactly to this many "
                                              "further training tokens (BatchTopK: the batch cut-off of the sample; "
                                              "feature choice: each latent's cut), so inference's mean L0 is k (0: "
                                              "keep the EMA)")

    def __post_init__(self):
        from saelab.settings import check

        check(0 <= self.threshold_momentum < 1, "threshold_momentum", f"must be in [0, 1), got {self.threshold_momentum}")
        check(self.threshold_start_step >= 0, "threshold_start_step", f"must be >= 0, got {self.threshold_start_step}")
        check(self.calibration_tokens >= 0, "calibration_tokens", f"must be >= 0, got {self.calibration_tokens}")


@dataclass
class NoOptions:
    pass


class Architecture:
    """TopK's behaviour is the default of every hook; a subclass overrides what differs."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_grads: ClassVar[bool] = False  # training asks the data source for LM-loss gradients
    # False: the SAE skips the dense pre-activation GEMM and passes pre=None (the architecture computes its own
    # code from x_c, e.g. matching pursuit, whose encoder is the decoder)
    needs_preacts: ClassVar[bool] = True
    trainable: ClassVar[bool] = True  # False: inference only (imported SAEs)
    # False: decoder rows keep their learned norms (no renormalisation after a step, no gradient projection); the
    # loss weighs each latent by its decoder norm instead (Anthropic's ReLU SAE, Gated)
    unit_decoder: ClassVar[bool] = True
    signed_codes: ClassVar[bool] = False  # True: code values may be negative (AbsTopK); AuxK then ranks by |pre|
    # True: with `SAEConfig.encoder_chunk` the selection runs block by block without the [B, n] matrix
    # (`select_streaming`): a per-token top-k of an elementwise key of pre (`stream_key`,
    # `saelab.kernels.topk_stream`), or a batch-level one (`saelab.sae.batch_select`)
    streams: ClassVar[bool] = False
    # why this architecture cannot be a transcoder (`saelab.sae.transcoder`); "" where it can
    transcoder_refusal: ClassVar[str] = ""
    # latent-parallel training (`saelab.sae.latent_shard`): "token", a per-token top-k chosen from every shard's
    # candidates; "batch", a batch-level selection whose collectives already span every rank; "": not shardable.
    # Read from the class itself (`latent_sharding`), not inherited: a subclass that changes the selection or the
    # losses (g-SAE, Matryoshka) opts in anew
    latent_sharding: ClassVar[str] = ""

    def __init__(self, cfg):
        self.cfg = cfg
        self.opt = self.Options(**cfg.options)

    # ---------------------------------------------------------------------------------------------- state
    def init_state(self, sae) -> None:
        """Register buffers on the SAE module (they travel in its state_dict and in checkpoints)."""

    @torch.no_grad()
    def init_parameters(self, sae) -> None:
        """After the SAE's tied init (unit-norm random decoder rows, W_enc = W_decᵀ, zero biases): the
        architecture's own parameters and any change to that init."""

    @torch.no_grad()
    def init_from_data(self, sae, x_norm: torch.Tensor, y_norm: torch.Tensor) -> None:
        """At the end of `SparseAutoencoder.init_from_data_`, on its normalised sample x̃ [N, d_in] and what the
        decoder must reproduce of it, ỹ (x̃ itself for an SAE, the target for a transcoder; b_pre and b_dec already
        set): data-dependent state (JumpReLU places its thresholds)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks of the options against the SAE's config once its width is known (`SAEConfig`, n_latents set);
        raise `ConfigError` naming the option."""

    def begin_step(self, step: int, steps: int) -> None:
        """Before training step `step` (0-based) of `steps`: step-dependent settings such as a penalty's warm-up.
        Worked out from the step alone, so a resumed run gets what an uninterrupted one did."""

    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        """After each optimizer step (e.g. update a threshold from this step's code)."""

    calibrates = False  # True where `calibrate` fits an inference threshold (what `saelab calibrate` re-fits)

    @torch.no_grad()
    def calibrate(self, sae, draw: Callable[[], torch.Tensor | None], target_l0: float | None = None,
                  tokens: int | None = None) -> dict:
        """Once, after the last step: fit the inference state to the finished SAE on more training activations
        (`draw()` returns the next raw batch [B, d_in], or None when the source is spent) so that the mean L0 on
        them is `target_l0` (default k), from `tokens` of them (default the architecture's calibration_tokens).
        `saelab calibrate` calls it again on a user's own text. Returns what it set, for the run's record; the
        default has nothing to fit."""
        return {}

    def lr_scales(self) -> dict[str, float]:
        """Parameters (by name) that train at the learning rate times a factor of their own (JumpReLU's thresholds);
        the rest at the learning rate."""
        return {}

    # ---------------------------------------------------------------------------------------------- selection
    def select(self, sae, pre: torch.Tensor, grad: torch.Tensor | None, k: int):
        """Training selection: (indices [B, K], valid or None)."""
        return topk_indices(pre, k), None

    def stream_key(self, sae, grad: torch.Tensor | None) -> Key | None:
        """For `streams` architectures: the ranking key of a block of pre-activations whose per-token top-k is
        `select`'s choice (None: the pre-activations themselves)."""
        return None

    def select_streaming(self, sae, x_c: torch.Tensor, grad: torch.Tensor | None, k: int):
        """`select` with the selected pre-activations, (values, indices, valid or None), each [B, K], computed in
        blocks of `encoder_chunk` latents: the same indices, order and values as `select` on the dense pre."""
        vals, idx = streaming_topk(x_c, sae.W_enc, sae.b_enc, k, self.cfg.encoder_chunk,
                                   key=self.stream_key(sae, grad))
        return vals, idx, None

    def select_inference(self, sae, pre: torch.Tensor, grad: torch.Tensor | None):
        """Batch-independent selection used by `encode`."""
        return self.select(sae, pre, grad, self.cfg.k)

    def select_inference_streaming(self, sae, x_c: torch.Tensor, grad: torch.Tensor | None):
        """`select_inference` in blocks of `encoder_chunk` latents, as `select_streaming` is `select`'s."""
        return self.select_streaming(sae, x_c, grad, self.cfg.k)

    # ---------------------------------------------------------------------------------------------- codes
    def values(self, pre_selected: torch.Tensor) -> torch.Tensor:
        """Activation applied to the selected pre-activations (ReLU for the TopK family)."""
        return pre_selected.relu()

    def code_train(self, sae, x_c: torch.Tensor, pre: torch.Tensor, grad: torch.Tensor | None,
                   k: int | None = None) -> SparseCode:
        """Selected latents with values that carry the (sparse) encoder gradient; pre None: the streaming encoder.
        A latent shard (`sae.shard`, per-token selections) selects its own top-k, then keeps its part of the token's
        top-k over every shard's candidates."""
        k = k or self.cfg.k
        shard = shard_of(sae) if latent_sharding(self) == "token" else None
        here = k if shard is None else min(k, sae.cfg.n_latents)
        if pre is None:
            pre_selected, idx, valid = self.select_streaming(sae, x_c, grad, here)
        else:
            idx, valid = self.select(sae, pre, grad, here)
            pre_selected = pre.gather(1, idx)
        if shard is not None:
            pos, valid = shard.choose(pre_selected, idx, k)
            idx, pre_selected = idx.gather(1, pos), pre_selected.gather(1, pos)
        vals = self.values(encoder_values(x_c, sae.W_enc, sae.b_enc, idx, pre_selected))
        return SparseCode(idx, vals if valid is None else vals * valid)

    @torch.no_grad()
    def code_inference(self, sae, pre: torch.Tensor | None, grad: torch.Tensor | None,
                       x_c: torch.Tensor | None = None) -> SparseCode:
        """The inference code; pre None: the streaming encoder (from x_c in blocks)."""
        if pre is None:
            pre_selected, idx, valid = self.select_inference_streaming(sae, x_c, grad)
        else:
            idx, valid = self.select_inference(sae, pre, grad)
            pre_selected = pre.gather(1, idx)
        vals = self.values(pre_selected)
        return SparseCode(idx, vals if valid is None else vals * valid)

    def support_values(self, sae, x_norm: torch.Tensor, code: SparseCode) -> torch.Tensor:
        """`code` (this SAE's inference code of x̃ = x_norm [B, d]) as a function of x̃ with its support held fixed:
        [B, K] values equal to code.values, differentiable with the gradient of the architecture's own value
        function on the active slots (what attribution through a latent differentiates, e.g. circuit edges).
        Default: `values` of the selected pre-activations (∂value/∂pre = 1 where active: TopK, ReLU, JumpReLU,
        AbsTopK with its sign)."""
        return on_support(code, self.values(sae.preacts(x_norm).gather(1, code.indices)))

    # ---------------------------------------------------------------------------------------------- losses
    def losses(self, sae, x_norm: torch.Tensor, x_c: torch.Tensor, pre: torch.Tensor, code: SparseCode,
               grad: torch.Tensor | None, dead_mask: torch.Tensor | None):
        """(x̂ in normalised space, losses); losses["loss"] is the total to minimise. Default: FVU + AuxK."""
        x_hat = reconstruct(sae, code.indices, code.values)
        err = x_norm - x_hat
        losses = {"fvu": fvu(err, sae.loss_normalizer)}
        losses["loss"] = losses["fvu"] + self.aux_losses(sae, x_c, pre, err, dead_mask, losses)
        return x_hat, losses

    def aux_losses(self, sae, x_c, pre, err, dead_mask, losses: dict) -> torch.Tensor | float:
        """AuxK on the dead latents (adds "auxk" to `losses`); returns what to add to the total."""
        if dead_mask is None or self.cfg.aux_coef <= 0:
            return 0.0
        aux = auxk_loss(sae, x_c, pre, err.detach(), dead_mask, self.cfg.k_aux, signed=self.signed_codes,
                        chunk=self.cfg.encoder_chunk)
        if aux is None:
            return 0.0
        losses["auxk"] = aux
        return self.cfg.aux_coef * aux

    # ---------------------------------------------------------------------------------------------- export
    def saelens_export(self, sae) -> dict:
        """How SAELens should see this SAE: its architecture name, extra cfg.json keys, extra weight tensors."""
        return {"architecture": "topk", "cfg": {"k": self.cfg.k}, "tensors": {}}

    @torch.no_grad()
    def load_tensors(self, sae, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `saelens_export`'s "tensors": set the SAE's state from them, as read from a file (default:
        each into the SAE's tensor of the same name)."""
        for name, t in tensors.items():
            getattr(sae, name).copy_(t)


# -------------------------------------------------------------------------------------------------- shared pieces
def on_support(code: SparseCode, values: torch.Tensor) -> torch.Tensor:
    """code.values in value, with the gradient of `values` [B, K] on the active slots only (`support_values`)."""
    return code.values + (values - values.detach()) * code.active()


def latent_sharding(arch) -> str:
    """How an architecture (class or instance) trains latent-parallel: its own class's `latent_sharding`."""
    return vars(arch if isinstance(arch, type) else type(arch)).get("latent_sharding", "")


def topk_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    return pre.topk(k, dim=-1, sorted=False).indices


def fvu(err: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    """Normalised MSE with the SAE's fixed denominator E||x̃ − E x̃||² (a plain mean over tokens)."""
    return err.pow(2).sum(-1).mean() / normalizer


AUXK_DENSE_RATIO = 16  # AuxK runs densely over the dead columns while n_dead ≤ this × k_aux


def auxk_loss(sae, x_c: torch.Tensor, pre: torch.Tensor | None, err: torch.Tensor, dead_mask: torch.Tensor,
              k_aux: int, signed: bool = False, chunk: int = 0) -> torch.Tensor | None:
    """AuxK (Gao et al.): the top-k_aux dead latents of each token reconstruct the (detached) residual; `signed`:
    ranked by |pre-activation| with their signed values (AbsTopK's codes, as SAELens's AbsTopK AuxK).

    Normalised by the residual's variance and scaled by min(n_dead / k_aux, 1) as sparsify does, so the loss does
    not jump when only a few latents are dead. Only the dead columns are ranked, and their codes are read from the
    main step's pre-activations (no second encoder GEMM; with the streaming encoder, `chunk` > 0, from a GEMM over
    the dead columns alone, in blocks of `chunk` of them when there are many). With few dead latents (the usual case) the auxiliary
    decoder and the encoder's backward run as small dense GEMMs over the dead columns, B·n_dead·d each, which BLAS
    does several times faster than the sparse kernels do the same B·k_aux·d work (k_aux = d/2 is large); with many
    dead the sparse kernels run instead. Same loss, same gradients.

    A latent shard (`sae.shard`) ranks its own dead latents and keeps its part of each token's top-k over every
    shard's; the auxiliary reconstruction is the sum of the shards' parts.
    """
    dead = dead_mask.nonzero().squeeze(1)
    shard = shard_of(sae)
    n_dead = dead.numel() if shard is None else int(shard.total(dead.numel()))
    if n_dead == 0:
        return None
    k = min(k_aux, n_dead)
    here = min(k, dead.numel())  # this shard's candidates (all of k on one process)
    dense = dead.numel() <= AUXK_DENSE_RATIO * k_aux
    streamed = pre is None  # the streaming encoder: the dead columns' pre-activations are computed here
    if dense or not streamed:
        with torch.no_grad():
            sub = (block_preacts(x_c, sae.W_enc, sae.b_enc, 0, dead.numel(), dead) if streamed
                   else pre.index_select(1, dead))
        local = (sub.abs() if signed else sub).topk(here, dim=-1, sorted=False).indices
        kept = sub.gather(1, local)
    else:  # many dead latents: their top-k in blocks of `chunk` dead columns
        kept, local = streaming_topk(x_c, sae.W_enc, sae.b_enc, here, chunk, key=abs_key if signed else None,
                                     columns=dead)
    valid = None
    if shard is not None:
        pos, valid = shard.choose(kept.abs() if signed else kept, dead[local], k)
        if here:
            local, kept = local.gather(1, pos), kept.gather(1, pos)
    if not here:  # a shard without dead latents adds nothing
        e_hat = err.new_zeros(err.shape)
    elif dense:
        kept = kept if signed else kept.relu()
        # scatter_add: a shard's slots that are not its own all point at column local[:, 0] with value 0
        z = torch.zeros_like(sub).scatter_add_(1, local, kept if valid is None else kept * valid)
        # row gathers by embedding: its backward is a row index_add, far cheaper than index_select's scatter_add
        z = DenseEncoder.apply(z, x_c.detach(), F.embedding(dead, sae.W_enc.T),
                               F.embedding(dead, sae.b_enc.unsqueeze(1)).squeeze(1), sae.b_pre)
        e_hat = z @ F.embedding(dead, sae.W_dec)
    else:
        idx = dead[local]
        vals = encoder_values(x_c, sae.W_enc, sae.b_enc, idx, kept)
        vals = vals if signed else vals.relu()
        e_hat = sparse_decode(idx, vals if valid is None else vals * valid, sae.W_dec)
    if shard is not None:
        e_hat = shard.sum(e_hat)
    denom = residual_variance(err).clamp_min(1e-12)
    scale = min(n_dead / k_aux, 1.0)
    return torch.nan_to_num(scale * (err - e_hat).pow(2).sum(-1).mean() / denom, 0.0)


def residual_variance(err: torch.Tensor) -> torch.Tensor:
    """E||e − E e||² over the batch's tokens: under torch.distributed over the global batch (every rank's tokens),
    so that AuxK's normaliser, and with it the averaged gradient, is what one process holding all rows computes."""
    if rank_world()[1] == 1:
        return (err - err.mean(0)).pow(2).sum(-1).mean()
    total = torch.cat([err.sum(0), err.new_tensor([err.shape[0]])])
    dist.all_reduce(total)
    sq = (err - total[:-1] / total[-1]).pow(2).sum().reshape(1)
    dist.all_reduce(sq)
    return sq[0] / total[-1]


class DenseEncoder(torch.autograd.Function):
    """Codes z of a set of latents (AuxK's dead ones; all of them on the dense path of ReLU and Gated SAEs) with the
    gradient of x_c·W_rowsᵀ + b_rows where z ≠ 0 (a ReLU'd code: where it is > 0), taken from the main step's
    pre-activations (no GEMM in the forward): the dense counterpart of `encoder_values`. The backward gives W_rows and b_rows their gradients and
    b_pre (an SAE's b_dec) its gradient through x_c = x̃ − b_pre as −(Σ_tokens g)·W_rows, a vector product instead of
    a [B, d] GEMM."""

    @staticmethod
    def forward(ctx, z, x_c, w_rows, b_rows, b_pre):
        ctx.save_for_backward(z, x_c, w_rows)
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        z, x_c, w_rows = ctx.saved_tensors
        g = g * (z != 0)
        g_sum = g.sum(0)
        return None, None, g.T @ x_c, g_sum, -(g_sum @ w_rows)


def pack_rows(rows: torch.Tensor, cols: torch.Tensor, n_rows: int,
              presorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, col) pairs → padded `(indices [n_rows, K], valid [n_rows, K])`, K = the most pairs in one row,
    each row's columns in ascending order; no Python loop. `presorted`: the pairs already come in (row, col) order,
    as `nonzero` gives them (no sort)."""
    if not presorted:
        order = torch.argsort(rows * (cols.max() + 1 if cols.numel() else 1) + cols)
        rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=n_rows)
    K = max(1, int(counts.max())) if rows.numel() else 1
    # sorted pairs fill the first counts[row] slots of each row, in order: one row-major masked scatter
    valid = torch.arange(K, device=rows.device) < counts.unsqueeze(1)
    indices = torch.zeros(n_rows, K, dtype=torch.long, device=rows.device).masked_scatter_(valid, cols)
    return indices, valid


def global_cut(values: torch.Tensor, want: int, world: int) -> torch.Tensor:
    """The want-th largest of `values` (of every rank's values under torch.distributed)."""
    local = values.topk(min(want, values.numel()), sorted=False).values
    if world > 1:
        local = gather_rows(local)
    return local.topk(min(want, local.numel()), sorted=False).values.min()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked along dim 0 (ranks may hold different row counts: the short ones are padded with
    −inf, which ranks below every value)."""
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(rank_world()[1])]
    dist.all_gather(sizes, size)
    padded = torch.full((int(max(int(s) for s in sizes)), *t.shape[1:]), float("-inf"), dtype=t.dtype,
                        device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(rank_world()[1])]
    dist.all_gather(parts, padded)
    return torch.cat(parts)


def calibration_inputs(sae, draw: Callable[[], torch.Tensor | None], tokens: int) -> list[torch.Tensor]:
    """Normalised inputs x̃ of whole batches from `draw()` until `tokens` (counted over all ranks) are in, for an
    architecture's `calibrate`."""
    xs, n_tok = [], 0
    while n_tok * batch_count(sae) < tokens:
        x = draw()
        if x is None:
            break
        xs.append(sae.normalize_input(sae._check_input(x))[0])
        n_tok += x.shape[0]
    return xs


def threshold_indices(pre: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU-style inference: every latent whose pre-activation exceeds its threshold (scalar or [n])."""
    rows, cols = (pre > threshold).nonzero(as_tuple=True)
    return pack_rows(rows, cols, pre.shape[0], presorted=True)


# -------------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Architecture]] = {}


def registry() -> dict[str, type[Architecture]]:
    """name → Architecture class, for every architecture file (imported on first use)."""
    if not _REGISTRY:
        for mod in MODULES:
            module = importlib.import_module(f"saelab.sae.{mod}")
            for arch in getattr(module, "ARCHITECTURES", None) or (module.ARCHITECTURE,):
                _REGISTRY[arch.name] = arch
    return _REGISTRY


# why the architectures without `streams` keep the dense encoder (SAEConfig.encoder_chunk's refusal)
NOT_STREAMED = ("ReLU, Gated and JumpReLU codes keep every latent above a threshold (early in training half of them, "
                "as big as [batch, n_latents] itself) and read dense pre-activations in their losses; matching "
                "pursuit has no encoder GEMM")


def streaming_architectures() -> list[str]:
    return sorted(name for name, arch in registry().items() if arch.streams)


def get_architecture(name: str) -> type[Architecture]:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"sae.architecture: unknown architecture {name!r}; choose one of {sorted(reg)}")
    return reg[name]


def option_fields(name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(get_architecture(name).Options))
