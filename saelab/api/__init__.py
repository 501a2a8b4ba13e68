"""The notebook API: what the CLI commands do, returned as objects instead of printed.

    import saelab
    run = saelab.train(tokens="2M")                  # `saelab train --tokens 2M`; a Run (a table in Jupyter)
    run.core                                          # its held-out core metrics (CoreMetrics)
    saelab.top_activations(run, 12)                   # latent 12's top examples as highlighted tokens
    ev = saelab.evaluate(run, suites=["probing"])     # `saelab eval RUN --suite probing`

Each function calls the code its command calls (`saelab.training.pipeline`, `saelab.eval.run`, the dashboard
reader); nothing here computes a result another way.

One module per job: run (Run, load_sae), model (info, hooks, train_reference), training (train, cache, calibrate),
evaluation (evaluate), latents (dashboard, top_activations), steering (steer), patching (patch), bench
(bench_synthetic), doctor (doctor_report). No module is named after the function it holds: the function, exported
here, would hide the module of the same name (`import saelab.api.train as m` would give the function).
"""

from saelab.api.run import Run, load_sae
from saelab.api.model import InfoSettings, ModelInfo, hooks, info, train_reference
from saelab.api.training import CalibrateSettings, cache, calibrate, train
from saelab.api.evaluation import SUITES, Evaluation, evaluate
from saelab.api.latents import DashboardRunSettings, TopActivations, dashboard, top_activations
from saelab.api.steering import Steering, SteeringSweep, steer
from saelab.api.patching import PatchingReport, patch
from saelab.api.bench import PlantedBench, bench_synthetic
from saelab.api.doctor import doctor_report

__all__ = ["Run", "load_sae", "ModelInfo", "InfoSettings", "info", "hooks", "train_reference", "train", "cache",
           "CalibrateSettings", "calibrate", "SUITES", "Evaluation", "evaluate", "DashboardRunSettings", "dashboard",
           "TopActivations", "top_activations", "Steering", "SteeringSweep", "steer", "PatchingReport", "patch",
           "PlantedBench", "bench_synthetic", "doctor_report"]
