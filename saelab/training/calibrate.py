"""Re-fit a thresholded SAE's inference threshold(s) on other text: `saelab calibrate RUN --dataset PATH`.

BatchTopK, Matryoshka, mutual choice (one global θ) and feature choice (a θ per latent) infer with thresholds that
training calibrated for mean L0 = k on the training corpus. A fixed threshold does not adapt to text unlike that
corpus: there the pre-activations shift, and with them the L0 (measured on pip's source for SAEs trained on the
standard library: `bench/ood.py`). This re-runs the architecture's own calibration on activations of the user's
text, for a target mean L0 (default k), and leaves every weight as it was.

When to use it: when the SAE is applied to text whose L0 under the trained θ drifts far from k (the CLI prints
it before and after), or to choose another operating point (a lower L0) without retraining.
"""

from __future__ import annotations

import torch

from saelab.errors import ConfigError


def thresholded(sae) -> bool:
    """True when the SAE infers with calibrated thresholds (what this module re-fits)."""
    return bool(getattr(getattr(sae, "arch", None), "calibrates", False))


def check_target(sae, target_l0: float | None) -> None:
    if not thresholded(sae):
        arch = getattr(getattr(sae, "cfg", None), "architecture", type(sae).__name__)
        raise ConfigError(f"this SAE ({arch}) has no inference threshold to calibrate: it selects a fixed number "
                          f"of latents per token",
                          hint="calibrate re-fits BatchTopK, Matryoshka, mutual choice and feature choice SAEs")
    if target_l0 is not None and not 0 < target_l0 <= sae.n_latents:
        raise ConfigError(f"--target-l0 must be in (0, n_latents = {sae.n_latents}], got {target_l0}")


@torch.no_grad()
def mean_l0(sae, xs: list[torch.Tensor]) -> float:
    """Mean number of active latents per row of the raw activations `xs` under the SAE's inference rule."""
    fired = rows = 0
    for x in xs:
        code = sae.encode(x)
        fired += int((code.values != 0).sum())
        rows += x.shape[0]
    return fired / max(rows, 1)


def recalibrate(sae, batches, target_l0: float | None = None, tokens: int = 65_536) -> dict:
    """Re-fit `sae`'s thresholds in place on raw activation batches (an iterable of [B, d_in] tensors) so that
    the mean L0 on them is `target_l0` (default k). Returns the record: tokens used, L0 before and after on those
    tokens, and what the architecture set."""
    check_target(sae, target_l0)
    xs, n = [], 0
    for x in batches:
        xs.append(x)
        n += x.shape[0]
        if n >= tokens:
            break
    if not xs:
        raise ConfigError("calibrate: the text gave no activations", hint="use a larger --dataset or --split all")
    before = mean_l0(sae, xs)
    queue = iter(xs)
    info = sae.arch.calibrate(sae, lambda: next(queue, None), target_l0=target_l0, tokens=n)
    if not info:
        raise ConfigError("calibrate: no threshold gives that L0 on this text (fewer positive pre-activations per "
                          "token than the target)", hint="choose a lower --target-l0")
    return {"tokens": n, "target_l0": sae.cfg.k if target_l0 is None else target_l0, "l0_before": before,
            "l0_after": mean_l0(sae, xs), **info}
