"""saelab: sparse autoencoders for language-model interpretability.

The flow is one way: corpus (`data`) → model (`models`) → activations → trainer (`training`) → SAE (`sae`, `kernels`)
→ evaluators (`eval`) → dashboard → explorer (`explorer`; `saelab explore` runs its script by path).

In a notebook (`saelab.api`, the same code the CLI runs):

    run = saelab.train(tokens="2M")            # a Run: .sae, .config, .history, .core, .bundle
    saelab.evaluate(run, suites=["core"])      # CoreMetrics (a table in Jupyter)
    saelab.calibrate(run, dataset="my/code")   # re-fit a thresholded SAE's θ on your own text
    saelab.top_activations(run, 12)            # latent 12's strongest contexts, highlighted
    saelab.steer(run, [12], alpha=4, prompt="def f(")
    saelab.patch("reference", task="bracket")  # activation vs attribution patching vs RelP
"""

__version__ = "0.1.0"
API = ("train", "cache", "evaluate", "calibrate", "dashboard", "top_activations", "steer", "patch", "Run", "info",
       "hooks", "train_reference", "bench_synthetic", "doctor_report")


def __getattr__(name):  # lazy, so `import saelab` stays cheap (TransformerLens takes seconds to import)
    if name in ("load_model", "hook_names", "check_hook_names"):
        from saelab import models

        return getattr(models, name)
    if name == "load_sae":  # saelab and SAELens folders, or a run directory
        from saelab.api import load_sae

        return load_sae
    if name in API:
        from saelab import api

        return getattr(api, name)
    if name == "CorpusSpec":
        from saelab.data import CorpusSpec

        return CorpusSpec
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")
