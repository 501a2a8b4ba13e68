"""`saelab.evaluate`: score a run with the core, probing and steering suites (`saelab eval`), an `Evaluation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from saelab.api.run import Run, as_run
from saelab.errors import ConfigError
from saelab.settings import as_count, check

SUITES = {"core": 65_536, "probing": 80_000, "steering": 65_536}  # `saelab eval --suite`s: their default tokens


@dataclass
class Evaluation:
    """Results of `saelab.evaluate`: `core` (CoreMetrics), `probing` (ProbingResult), `steering` (SteeringScores),
    each None unless its suite ran; `paths` are the files written under RUN/eval."""

    run: Run
    core: Any = None
    probing: Any = None
    steering: Any = None
    paths: dict[str, Path] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        parts = [getattr(self, s)._repr_html_() for s in SUITES if getattr(self, s) is not None]
        return "".join(parts) or "<i>no suite ran</i>"

    def __repr__(self) -> str:
        ran = [s for s in SUITES if getattr(self, s) is not None]
        return f"Evaluation({self.run!r}, suites={ran})"

    def __str__(self) -> str:  # what `saelab eval` prints
        from saelab.eval.core import format_core
        from saelab.eval.probing import format_probing
        from saelab.eval.steering import format_scores

        formats = {"core": format_core, "probing": format_probing, "steering": format_scores}
        return "\n".join(formats[s](getattr(self, s)) for s in SUITES if getattr(self, s) is not None)


def evaluate(run, suites: str | Sequence[str] = ("core",), tokens: int | str | None = None,
             **probing) -> Evaluation:
    """Score a run as `saelab eval RUN --suite …` does, for each suite in `suites` (core, probing, steering),
    loading the model once; `tokens` held-out tokens (default: each suite's, `SUITES`). `probing` keywords:
    `saelab.eval.probing.ProbingSettings`'s (selection, max_density, ks, data, level, text_field, label_field,
    pooling), checked, and the data read, before the model loads.

    >>> ev = saelab.evaluate(run, suites=["core", "probing"])      # doctest: +SKIP
    >>> ev.core.explained_variance                                 # doctest: +SKIP
    """
    from saelab.eval.run import evaluate_run, load_run, probe_run, score_run

    suites = [suites] if isinstance(suites, str) else list(suites)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ConfigError(f"suites: {bad or suites!r}; use any of {', '.join(SUITES)}")
    n = None if tokens is None else as_count(tokens, "tokens")
    check(n is None or n > 0, "--tokens", f"must be > 0, got {n}")
    budget = {s: n or SUITES[s] for s in suites}
    if "probing" in suites:
        from saelab.eval.probing import ProbingSettings

        probe = ProbingSettings(**probing)
        probe.labelled  # noqa: B018  (read and checked before the model loads: a bad line fails at once)
    path = run.path if isinstance(run, Run) else Path(run)
    sae_only = {"probing": "sparse probing", "steering": "steering scores"}  # a transcoder: refused before the model
    loaded = load_run(path, require=" and ".join(sae_only[s] for s in suites if s in sae_only))
    ev = Evaluation(as_run(run))
    if "core" in suites:
        ev.core, ev.paths["core"] = evaluate_run(path, budget["core"], loaded=loaded)
    if "probing" in suites:
        ev.probing, ev.paths["probing"] = probe_run(path, budget["probing"], loaded=loaded, settings=probe)
    if "steering" in suites:
        ev.steering, ev.paths["steering"] = score_run(path, budget["steering"], loaded=loaded)
    return ev
