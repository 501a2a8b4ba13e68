"""`saelab.steer`: generation steered by SAE latents (`Steering`), or a sweep of strengths scored for concept
success and fluency (`SteeringSweep`), as `saelab steer` does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from saelab.api.run import Run, as_run
from saelab.errors import ConfigError
from saelab.eval.run import SteerSettings
from saelab.settings import as_count


@dataclass
class Steering:
    """`saelab.steer`'s generations: the `steered` and `unsteered` continuations of `prompt` (same seed), with
    the settings that made them (`alphas` per latent, `strength_scale` what they multiply: "position", the largest
    latent activation at each position, or "corpus", each latent's `max_activation`)."""

    run: Run
    prompt: str
    latents: list[int]
    alphas: list[float]
    strength_scale: str
    max_activation: list[float] | None
    mode: str
    seed: int
    temperature: float
    max_new_tokens: int
    unsteered: str
    steered: str

    def __str__(self) -> str:  # what `saelab steer` prints
        from dataclasses import fields

        from saelab.eval.run import format_steer

        return format_steer({f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"})

    def _repr_html_(self) -> str:
        import html

        scale = "the largest latent activation at each position" if self.strength_scale == "position" else \
            f"max activation {self.max_activation}"
        head = (f"prompt {self.prompt!r} · latents {self.latents} · α {self.alphas} × {scale} · {self.mode} · "
                f"seed {self.seed}, temperature {self.temperature}")
        cell = "vertical-align:top;padding:2px 12px 2px 0;width:50%"
        text = "font-family:monospace;font-size:12px;white-space:pre-wrap;margin:0"
        cols = "".join(f"<td style='{cell}'><div style='font-weight:600'>{name}</div><pre style='{text}'>"
                       f"{html.escape(self.prompt)}<b>{html.escape(out)}</b></pre></td>"
                       for name, out in (("unsteered", self.unsteered), ("steered", self.steered)))
        return (f"<div><div style='font-weight:600;margin:4px 0'>{html.escape(head)}</div>"
                f"<table style='border-collapse:collapse;width:100%'><tr>{cols}</tr></table></div>")


@dataclass
class SteeringSweep:
    """`saelab.steer(..., sweep=True)`: concept success@k (generated tokens among the latent's top logit-lens
    tokens), its per-token rate and fluency (the unsteered model's nats/token on the steered text) per latent ×
    α; `result` is the dict written to `paths` (RUN/eval/steer_sweep_<latents>.json and .html)."""

    run: Run
    result: dict
    paths: list[Path]

    @property
    def alphas(self) -> list[float]:
        return self.result["alphas"]

    @property
    def success(self) -> dict[int, list[float]]:
        """latent → success@k per α."""
        return dict(zip(self.result["latents"], self.result["success"]))

    @property
    def fluency(self) -> dict[int, list[float]]:
        """latent → nats/token per α (lower is more fluent)."""
        return dict(zip(self.result["latents"], self.result["fluency_nats"]))

    def figure(self):
        """Plotly: success and fluency against α, a line per latent (the sweep's HTML page)."""
        from saelab.eval.run import sweep_figure

        return sweep_figure(self.result)

    def __str__(self) -> str:  # what `saelab steer --sweep` prints
        from saelab.eval.run import format_steer

        return format_steer(self.result)

    def _repr_html_(self) -> str:
        from saelab.display import grid_html

        r = self.result
        rows = [[f, a, r["success"][i][j], r["rate"][i][j], r["fluency_nats"][i][j]]
                for i, f in enumerate(r["latents"]) for j, a in enumerate(r["alphas"])]
        return grid_html(["latent", "α", f"success@{r['k']}", "rate", "fluency (nats)"], rows,
                         title=f"steering sweep · {r['n_prompts']} prompt(s) × {r['max_new_tokens']} new tokens")


def steer(run, latents: int | Sequence[int], alpha: float | Sequence[float] = SteerSettings.alpha,
          prompt: str = SteerSettings.prompt, max_new_tokens: int = SteerSettings.max_new_tokens,
          temperature: float = SteerSettings.temperature, seed: int = SteerSettings.seed,
          mode: str = SteerSettings.mode,
          sweep: bool = False, alphas: Sequence[float] | None = None, tokens: int | str = SteerSettings.tokens,
          strength_scale: str = SteerSettings.strength_scale):
    """Steer generation with SAE latents as `saelab steer` does: add α × (the largest latent activation at the
    position, the paper's rule) × the latent's decoder direction at every position (mode="clamp": set the one
    latent to that value instead) → `Steering` (steered vs unsteered text); `alpha`: one strength, or one per
    latent. sweep=True → `SteeringSweep` over the grid `alphas`, or several `alpha`s (default: the paper's 13
    strengths, 0 to 20). prompt "": a newline, or for a sweep the eight neutral code prefixes.
    strength_scale="corpus": α × each latent's max activation instead, from RUN/eval/steering_scores.parquet
    (`saelab.evaluate(run, suites=["steering"])`) or else a pass over `tokens` held-out tokens. The settings are
    `saelab.eval.run.SteerSettings`'s, checked before the model loads.

    >>> saelab.steer(run, [12], alpha=4, prompt="def f(")                          # doctest: +SKIP
    >>> saelab.steer(run, [12, 40], sweep=True).figure()                           # doctest: +SKIP
    """
    from numbers import Number

    from saelab.eval.run import steer_run

    latents = [int(latents)] if isinstance(latents, Number) else [int(f) for f in latents]
    strengths = [alpha] if isinstance(alpha, Number) else list(alpha)
    if sweep and alphas is not None:
        if len(alphas) == 1:
            raise ConfigError(f"alphas: a sweep needs at least two strengths, got {[float(a) for a in alphas]}")
        strengths = list(alphas)
    st = SteerSettings(alpha=strengths, strength_scale=strength_scale, prompt=prompt or "",
                       max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, mode=mode, sweep=sweep,
                       tokens=as_count(tokens, "tokens"))
    path = run.path if isinstance(run, Run) else Path(run)
    result, paths = steer_run(path, latents, st)
    run = as_run(run)
    return SteeringSweep(run, result, paths) if sweep else Steering(run, **result)
