"""Matching-pursuit SAE, MP-SAE (Costa, Fel, Lubana, Tolooshams, Ba 2025): no encoder; T unrolled steps of
residual pursuit over the unit-norm decoder atoms,

    r = x̃ − b_dec;  for t in 1..T:  j = argmax_i score(<r, d_i>);  v = <r, d_j>;  z_j += v;  r −= v·d_j

so the residual drops by v² each step (‖r‖ is non-increasing), r ⟂ d_j after the step, x̂ + r = x̃, and the
same atom may be chosen again (L0 ≤ T). The loss is the plain FVU: sparsity is the number of steps.

Choices (research notes §4), as options:
* tied encoder (the paper's and SAELens's: the dictionary is the encoder). `W_enc`/`b_enc` are not used; `W_enc`
  is kept equal to W_dec^T after each step so a saved folder reads as the tied SAE it is.
* `select`: "relu" (default; SAELens and the authors' toy code: codes ≥ 0, a step whose best correlation is ≤ 0
  adds nothing), "max" (overcomplete: argmax of the signed correlation, value may be negative), "abs" (classic MP:
  argmax |<r, d_i>|, signed values).
* stop rule: `steps` (0 = k) and, per token, `tol` on ‖r‖ (0 = off) and `stop_on_duplicate_support` (a token stops
  after a step re-selects an atom of its support: the authors' toy code, "until the support stops changing", and
  SAELens's flag of that name); `inference_steps` may exceed `steps`.
* b_dec is the pre-bias (the notes' optional b_pre), initialised to the geometric median like every saelab SAE.

When MP avoids feature absorption (issue 24; `saelab bench synthetic`, README "planted features"). The paper's zero
absorption on its toy tree comes from pursuing every row to convergence: T large (n_latents) with `tol` 0.05 and the
duplicate stop, so no row runs out of steps. It holds with co-firing parents too (`--parents independent`: −0.000,
every feature recovered, seeds 0–2). It does not hold when T is a budget that some rows exceed: a merged child +
parent atom then saves a step, and MP absorbs like TopK. On the co-firing tree (18 % of rows hold more than 2
features, 2.3 % more than 4) T = 2, 3, 4 give absorption 0.55–0.68 (TopK at k 2: 0.53–0.73 over seeds 0–2), T ≥ 6
gives 0.00; on the paper's tree (never more than 2 per row) T = 2 gives 0.07. At a binding T nothing else moves it
(1500 steps of 200 rows): `tol`, `stop_on_duplicate_support` or both 0.66, lr 3e-3 to 3e-2 with Adam betas (0.9,
0.999) or (0.5, 0.9375) 0.57–0.66, select "max"/"abs" 0.66/0.57. With T free, the optimiser decides how fast MP gets
there: in 1500 steps of 200 rows lr 3e-2 reaches 0.00 with either betas, the library's lr for 20 latents (5.7e-3)
0.17; in 244 steps of 4096 rows the paper's betas (0.5, 0.9375) give 0.11, (0.9, 0.999) 0.33. The default stays T =
k with no early stop: on a language model T is the L0 budget (a larger T compares MP at a larger L0), a residual
stream holds more active features per token than any practical k, so the converged regime does not exist there; and
training with a larger T to infer at k costs reconstruction (co-firing tree: trained at T 8, inferred at 2: FVU 0.18
against 0.07 trained at 2). Expect MP's LM dictionaries to absorb like other k-sparse SAEs', not like the toy tree's
(untested on a language model: saelab has no absorption metric for one yet).

Cost. Selection (no autograd) keeps the correlations c = r·Dᵀ of each token and updates them from rows of the
decoder Gram matrix G = D·Dᵀ, c ← c − v·G[j] (a sparse one-entry-per-row [b, n] matrix times G, added in place:
one pass over c), and finds each row's maximum from block maxima (`row_argmax`; on the CPU `amax` is vectorised,
`max`/`argmax` are not): one dense GEMM to start plus one n²·d Gram GEMM per training step instead of T GEMMs; each
update then costs B·n memory work instead of B·n·d flops. G takes n² floats, so it is used while
n ≤ `gram_max_latents` (default 16384, 1 GiB); above that each step recomputes r·Dᵀ. bench/mp_step.py measures
both over n. Tokens are processed in chunks whose [chunk, n] correlation block stays in cache. The values carry
the gradient (through the whole unrolled loop, as both author codes do): with the chosen atoms A fixed, v solves
the unit-lower-triangular system (I + M·L)·v = M·(A x̃_c), L = strictly lower part of A·Aᵀ per token (a batched
GEMM of the chosen atoms A [B, T, d], so G stays out of the autograd graph; A and its gradient take 2·B·T·d floats),
M the steps that count (relu/stop): a [B, T, T] batched solve, no Python loop over tokens, and A·x̃_c is a sparse
gather-dot with the sparse encoder backward (`encoder_values` with W_enc = Dᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saelab.kernels import encoder_values, ops_for
from saelab.sae.architectures import Architecture, on_support
from saelab.settings import setting as option
from saelab.sae.code import SparseCode

SELECT_MODES = ("relu", "max", "abs")
CHUNK_BYTES = 8 << 20  # correlation block per token chunk: fits in L3 next to the gathered Gram rows


@dataclass
class MatchingPursuitOptions:
    steps: int = option(0, "pursuit steps T in training (0 = k); L0 ≤ T. MP avoids absorption only when T is not a "
                           "binding budget (more than any row's features, with tol to stop): see the docstring")
    inference_steps: int = option(0, "pursuit steps at inference (0 = steps); more steps never raise the error")
    tol: float = option(0.0, "also stop a token once its residual norm ‖r‖ ≤ tol (normalised space; 0 = off)")
    select: str = option("relu", "relu: codes ≥ 0 (SAELens, authors' toy code); max: signed argmax (overcomplete); "
                                 "abs: classic MP, argmax |<r, d>| with signed values")
    stop_on_duplicate_support: bool = option(False, "stop a token after it re-selects an atom it already uses (that "
                                                    "step still counts; the MP-SAE paper's synthetic runs)")
    gram_max_latents: int = option(16384, "update correlations from the decoder Gram matrix while n_latents ≤ this "
                                          "(n² floats); above it, one r·Dᵀ GEMM per step")

    def __post_init__(self):
        from saelab.settings import check

        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.inference_steps >= 0, "inference_steps", f"must be >= 0, got {self.inference_steps}")
        check(self.tol >= 0, "tol", f"must be >= 0, got {self.tol}")
        check(self.select in SELECT_MODES, "select", f"must be one of {SELECT_MODES}, got {self.select!r}")
        check(self.gram_max_latents >= 0, "gram_max_latents", f"must be >= 0, got {self.gram_max_latents}")


class MatchingPursuit(Architecture):
    name = "mp"
    help = "MP-SAE (Costa et al. 2025): T steps of matching pursuit over the decoder atoms (tied, no encoder)"
    Options = MatchingPursuitOptions
    needs_preacts = False
    transcoder_refusal = ("matching pursuit explains its input by its own decoder rows (its encoder is its "
                          "dictionary), so it cannot write another hook's activations")

    @property
    def train_steps(self) -> int:
        return self.opt.steps or self.cfg.k

    @property
    def inference_steps(self) -> int:
        return self.opt.inference_steps or self.train_steps

    def code_train(self, sae, x_c, pre, grad, k=None) -> SparseCode:
        return self.pursuit(sae, x_c, k or self.train_steps)

    @torch.no_grad()
    def code_inference(self, sae, pre, grad, x_c=None) -> SparseCode:
        return self.pursuit(sae, x_c, self.inference_steps)

    def pursuit(self, sae, x_c: torch.Tensor, steps: int) -> SparseCode:
        """Pursuit over the unit directions u_i = W_dec,i/‖W_dec,i‖ (training keeps ‖W_dec,i‖ = 1; a saved SAE has
        its input scale folded into W_dec); the code's values are the coefficients of the rows of W_dec."""
        norms = sae.W_dec.norm(dim=1)
        U = sae.W_dec / norms.unsqueeze(1)
        with torch.no_grad():
            G = U @ U.T if self.use_gram() else None  # one n²·d GEMM, for the selection only
        idx, keep = pursuit_indices(x_c.detach(), U.detach(), steps, self.opt.select, self.opt.tol, G=G,
                                    gram=G is not None, stop_on_repeat=self.opt.stop_on_duplicate_support)
        code = pursuit_code(x_c, U, idx, keep)
        return SparseCode(code.indices, code.values / norms[code.indices])

    def support_values(self, sae, x_norm, code) -> torch.Tensor:
        """The pursuit's coefficients are linear in x̃ for a fixed sequence of atoms: rerun it (the same atoms, in the
        same order), differentiably."""
        return on_support(code, self.pursuit(sae, x_norm - sae.b_dec, self.inference_steps).values)

    def use_gram(self) -> bool:
        return self.cfg.n_latents <= self.opt.gram_max_latents

    def aux_losses(self, sae, x_c, pre, err, dead_mask, losses):
        return 0.0  # no pre-activations to rank dead latents by (the paper revives with a factor, not AuxK)

    @torch.no_grad()
    def after_step(self, sae, out, step: int) -> None:
        sae.W_enc.copy_(sae.W_dec.T)  # tied: the saved encoder is the dictionary

    def saelens_export(self, sae) -> dict:
        return {"architecture": "matching_pursuit",
                "cfg": {"residual_threshold": self.opt.tol, "max_iterations": self.inference_steps,
                        "stop_on_duplicate_support": self.opt.stop_on_duplicate_support},
                "tensors": {}}


# -------------------------------------------------------------------------------------------------- the pursuit
@torch.no_grad()
def pursuit_indices(x_c: torch.Tensor, D: torch.Tensor, steps: int, select: str = "relu", tol: float = 0.0,
                    gram: bool = True, chunk: int | None = None, G: torch.Tensor | None = None,
                    stop_on_repeat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy atom choices of matching pursuit over unit rows D: (indices [B, T], keep [B, T] bool: the step
    changed the residual). Correlations are updated from Gram rows (`gram=True`; G = D·Dᵀ unless given) or
    recomputed as r·Dᵀ each step; tokens go in chunks. `stop_on_repeat`: a token's last step is the first that
    re-selects an atom of its support."""
    B, n = x_c.shape[0], D.shape[0]
    if gram and G is None:
        G = D @ D.T
    elif not gram:
        G = None
    chunk = chunk or max(1, min(B, CHUNK_BYTES // (4 * n)))
    idx = torch.empty(B, steps, dtype=torch.long, device=x_c.device)
    keep = torch.empty(B, steps, dtype=torch.bool, device=x_c.device)
    for s in range(0, B, chunk):
        _pursue(x_c[s:s + chunk], D, G, steps, select, tol, idx[s:s + chunk], keep[s:s + chunk], stop_on_repeat)
    return idx, keep


def _pursue(x, D, G, steps, select, tol, idx_out, keep_out, stop_on_repeat=False):
    c = x @ D.T  # [b, n] correlations of the residual with every atom
    r = None if G is not None else x.clone()
    r2 = x.pow(2).sum(-1)  # ‖r‖², drops by v² per step (unit atoms)
    live = torch.ones_like(r2, dtype=torch.bool)
    rows = torch.arange(x.shape[0], device=x.device)
    for t in range(steps):
        j = row_argmax(c.abs() if select == "abs" else c)
        v = c[rows, j]
        if select == "relu":
            v = v.clamp_min(0)
        if tol > 0:
            live &= r2 > tol * tol
        v = v * live
        if stop_on_repeat:  # this step still counts; the token stops after it
            live &= ~((idx_out[:, :t] == j.unsqueeze(1)) & keep_out[:, :t]).any(1)
        idx_out[:, t] = j
        keep_out[:, t] = v != 0
        r2 = r2 - v * v
        if G is not None:  # c −= v·G[j] as a sparse [b, n] (one entry per row) @ G: one fused pass over c
            S = torch.sparse_coo_tensor(torch.stack([rows, j]), v, c.shape, check_invariants=False,
                                        is_coalesced=True)
            c.addmm_(S, G, alpha=-1.0)
        else:
            r.addcmul_(D[j], v.unsqueeze(1), value=-1.0)
            torch.mm(r, D.T, out=c)


def row_argmax(c: torch.Tensor, block: int = 64) -> torch.Tensor:
    """argmax of each row (first index of the maximum, as torch.argmax). On the CPU `amax` is vectorised and
    `max`/`argmax` are not, so rows are cut into blocks: the block maxima find the block, one small argmax inside."""
    B, n = c.shape
    if n % block or n < 4 * block:
        return c.argmax(1)
    blocks = c.view(B, n // block, block)
    which = blocks.amax(2).argmax(1)
    return which * block + blocks[torch.arange(B, device=c.device), which].argmax(1)


def pursuit_values(x_c: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The pursuit's coefficients [B, T] for fixed choices, differentiable in x_c and D.

    v_t = m_t·<r_{t−1}, a_t> with r_{t−1} = x − Σ_{s<t} v_s a_s, i.e. (I + M·L) v = M·(A x), L the strictly lower
    part of A·Aᵀ (A = the chosen atoms, per token), M = diag(keep): one batched unit-triangular solve. A·x is a
    sparse gather-dot (`encoder_values` with W_enc = Dᵀ); A·Aᵀ a batched GEMM of the chosen atoms (B·T²·d). Gathering
    it from the selection's Gram matrix instead would keep G = D·Dᵀ in the graph: its backward is two n²·d GEMMs
    and an [n, n] scatter, about a fifth of the whole training step at n 4096."""
    m = keep.to(D.dtype)
    with torch.no_grad():
        c0 = ops_for(idx, x_c, D).gather_dot(idx, x_c.detach().to(D.dtype).contiguous(), D.detach())
    c = encoder_values(x_c, D.T, None, idx, c0)  # [B, T] = <x, a_t>, sparse backward to x and D
    A = F.embedding(idx, D)  # [B, T, d]; its backward is one row index_add into D's gradient
    L = _Gram.apply(A).tril(-1) * m.unsqueeze(2)
    eye = torch.eye(idx.shape[1], dtype=D.dtype, device=D.device)
    return torch.linalg.solve_triangular(eye + L, (m * c).unsqueeze(2), upper=False, unitriangular=True).squeeze(2)


class _Gram(torch.autograd.Function):
    """A·Aᵀ per token, with the one-bmm backward (g + gᵀ)·A (autograd's would be two bmms and a transpose)."""

    @staticmethod
    def forward(ctx, A):
        ctx.save_for_backward(A)
        return torch.bmm(A, A.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        (A,) = ctx.saved_tensors
        return torch.bmm(g + g.transpose(1, 2), A)


def merge_repeats(idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Values with each re-selected atom's coefficients summed into its first slot (later slots 0), so the code's
    L0 counts distinct atoms; differentiable in values."""
    same = idx.unsqueeze(2) == idx.unsqueeze(1)  # [B, T, T]
    first = same.to(torch.uint8).argmax(2)  # first slot holding the same atom
    return torch.zeros_like(values).scatter_add(1, first, values)


def pursuit_code(x_c: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> SparseCode:
    return SparseCode(idx, merge_repeats(idx, pursuit_values(x_c, D, idx, keep)))


ARCHITECTURE = MatchingPursuit
