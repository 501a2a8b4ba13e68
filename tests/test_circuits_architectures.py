"""Attribution through a latent uses the architecture's own value function (`Architecture.support_values`, used by
`circuits.dense_codes` for the Jacobians of circuit edges): for every architecture, the Jacobian of the latent values
with respect to the hook activation, support held fixed, equals a central finite difference of `sae.encode` alone;
for a Gated SAE (value = ReLU(exp(r_mag)·(x_c·W) + b_mag), so ∂value/∂pre = exp(r_mag), not 1) also autograd through
the paper's formula written densely here."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.eval import circuits
from saelab.sae import SparseAutoencoder

D, N = 8, 24
ARCHS = ("topk", "relu", "jumprelu", "gated", "abstopk", "mp")


def make_sae(arch: str, seed: int = 0) -> SparseAutoencoder:
    options = {"select": "abs"} if arch == "mp" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=N, k=4, architecture=arch, normalize="none",
                                      options=options))
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        if arch == "gated":  # away from the tie's init, so a wrong ∂value/∂pre = 1 shows
            sae.r_mag.copy_(0.5 * torch.randn(N, generator=g))
            sae.b_mag.copy_(0.2 * torch.randn(N, generator=g))
        if arch == "jumprelu":
            sae.arch.set_threshold(sae, torch.full((N,), 0.3))
    return sae.double()


def inputs(n: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def jacobian(sae, x: torch.Tensor) -> torch.Tensor:
    """[n, N, D]: d f(x_t) / d x_t by autograd through `dense_codes` (tokens are independent)."""
    x = x.clone().requires_grad_(True)
    f, _ = circuits.dense_codes(sae, x.view(1, *x.shape))
    f = f[0]
    rows = [torch.autograd.grad(f[:, j].sum(), x, retain_graph=True)[0] for j in range(N)]
    return torch.stack(rows, 1)


def encode_dense(sae, x: torch.Tensor) -> torch.Tensor:
    return sae.encode(x).to_dense(N)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_jacobian_equals_a_finite_difference_of_encode(arch):
    sae = make_sae(arch)
    x = inputs()
    f0 = encode_dense(sae, x)
    assert (f0 != 0).sum() >= x.shape[0] and (arch != "abstopk" or (f0 < 0).any())
    J = jacobian(sae, x)
    eps = 1e-6
    for i in range(D):
        e = torch.zeros(D, dtype=torch.float64)
        e[i] = eps
        up, down = encode_dense(sae, x + e), encode_dense(sae, x - e)
        same = ((up != 0) == (f0 != 0)).all(1) & ((down != 0) == (f0 != 0)).all(1)  # support unchanged
        assert same.sum() >= x.shape[0] - 1
        fd = (up - down)[same] / (2 * eps)
        torch.testing.assert_close(J[same, :, i], fd, rtol=1e-6, atol=1e-7)
    assert J.abs().sum() > 0
    # values are unchanged by the differentiable form
    torch.testing.assert_close(circuits.dense_codes(sae, x.view(1, *x.shape))[0][0], f0)


def test_gated_jacobian_equals_autograd_through_the_paper_formula():
    sae = make_sae("gated")
    x = inputs().requires_grad_(True)
    x_c = x - sae.b_dec
    gate = x_c @ sae.W_enc + sae.b_enc  # π_gate
    mag = (x_c @ sae.W_enc) * sae.r_mag.exp() + sae.b_mag  # π_mag = x_c·(exp(r_mag) ⊙ W) + b_mag
    f = (gate > 0).to(x.dtype) * mag.relu()
    want = torch.stack([torch.autograd.grad(f[:, j].sum(), x, retain_graph=True)[0] for j in range(N)], 1)
    torch.testing.assert_close(f.detach(), encode_dense(sae, x.detach()))
    J = jacobian(sae, x.detach())
    torch.testing.assert_close(J, want.detach())
    # the old rule (∂value/∂pre = 1 on active latents) differs here: r_mag is not zero
    active = f.detach() != 0
    assert not torch.allclose(J[active], (sae.W_enc.T.unsqueeze(0).expand(x.shape[0], -1, -1))[active])
