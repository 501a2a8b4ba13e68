"""`saelab calibrate`: a thresholded SAE's θ re-fitted on other activations for a target mean L0."""

import os
import sys

import pytest
import torch

from saelab.errors import ConfigError
from saelab.training.calibrate import mean_l0, recalibrate

sys.path.insert(0, os.path.dirname(__file__))
from test_architectures import make  # noqa: E402


def _shifted_batches(seed=3, shift=1.5, n=4):
    """Activations unlike the ones θ was set on: every coordinate shifted, so more pre-activations clear θ."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(128, 24, generator=gen) + shift for _ in range(n)]


@pytest.mark.parametrize("target", [None, 2.5, 7])
def test_global_threshold_is_the_brute_force_cut_for_the_target_l0(target):
    sae = make("batchtopk")  # k 4
    sae.threshold.fill_(0.05)  # some θ from another text
    batches = _shifted_batches()
    info = recalibrate(sae, iter(batches), target_l0=target, tokens=300)
    want = 4 if target is None else target
    assert info["tokens"] == 384 and info["target_l0"] == want
    with torch.no_grad():
        pre = torch.cat([sae.preacts(sae.normalize_input(b)[0]) for b in batches[:3]])
    brute = pre.reshape(-1).sort(descending=True).values[round(want * 384) - 1]
    assert float(sae.threshold[0]) == pytest.approx(float(brute)) and torch.all(sae.threshold == sae.threshold[0])
    # encode counts strictly-above entries: the cut itself is the one entry short of L·N
    assert info["l0_after"] == pytest.approx(mean_l0(sae, batches[:3]))
    assert abs(info["l0_after"] - want) <= 1 / 384 + 1e-9
    assert info["l0_before"] != pytest.approx(info["l0_after"])


def test_weights_are_untouched():
    sae = make("matryoshka")
    before = {k: v.clone() for k, v in sae.state_dict().items() if k != "threshold"}
    sae.threshold.fill_(0.05)
    recalibrate(sae, iter(_shifted_batches()), tokens=256)
    for name, value in before.items():
        assert torch.equal(sae.state_dict()[name], value), name


def test_an_sae_without_a_threshold_is_refused():
    with pytest.raises(ConfigError, match="no inference threshold"):
        recalibrate(make("topk"), iter(_shifted_batches()))
    with pytest.raises(ConfigError, match="target-l0"):
        recalibrate(make("batchtopk"), iter(_shifted_batches()), target_l0=97)  # n_latents 96


def test_feature_choice_per_latent_thresholds_give_the_target_l0():
    sae = make("feature_choice")
    sae.threshold.fill_(0.05)
    batches = _shifted_batches()
    info = recalibrate(sae, iter(batches), target_l0=6, tokens=512)
    # θ_i sits between latent i's m_i-th and (m_i+1)-th largest pre-activation (Σ m_i = 6·N), and never below 0
    # (a ReLU latent cannot fire on a negative pre-activation): latent i fires on min(m_i, #positive) tokens
    m = sae.arch.capacities(sae, 512, l0=6)
    assert int(m.sum()) == 6 * 512
    with torch.no_grad():
        pre = torch.cat([sae.preacts(sae.normalize_input(b)[0]) for b in batches])
    brute = torch.minimum(m, (pre > 0).sum(0)).sum().item() / 512
    assert info["l0_after"] == pytest.approx(brute) and info["l0_after"] == pytest.approx(mean_l0(sae, batches))
    assert 4 < brute <= 6
