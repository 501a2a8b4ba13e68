"""saelab: sparse autoencoders for language-model interpretability.

The flow is one way: corpus (`data`) → model (`models`) → activations → trainer (`train`) → SAE (`sae`, `kernels`)
→ evaluators (`eval`) → dashboard → explorer (`app/`).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import saelab` stays cheap (TransformerLens takes seconds to import)
    if name in ("load_model", "hook_names", "check_hook_names"):
        from saelab import models

        return getattr(models, name)
    if name == "load_sae":  # saelab and SAELens folders
        from saelab.sae.saelens import load_sae

        return load_sae
    if name == "CorpusSpec":
        from saelab.data import CorpusSpec

        return CorpusSpec
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")
