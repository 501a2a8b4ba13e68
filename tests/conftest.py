"""Shared fixtures. Kept minimal: the embedded reference model and its tokenizer, each loaded once per session.

Importing TransformerLens takes seconds (tens of seconds on a loaded machine), so only tests that ask for
`reference_model` pay for it, and they pay once.
"""

import pytest


@pytest.fixture(scope="session")
def reference_tokenizer():
    """The reference model's tokenizer (plain `transformers`, no TransformerLens import)."""
    from transformers import AutoTokenizer

    from saelab.models import reference_dir

    return AutoTokenizer.from_pretrained(reference_dir())


@pytest.fixture(scope="session")
def reference_model():
    """`saelab.load_model("reference")`: a float32 `TransformerBridge` in eval mode, on the CPU.

    Shared by the whole session: use hooks through context managers (`run_with_cache`, `hooks(...)`) and do not
    change its weights.
    """
    from saelab.models import load_model

    return load_model("reference")


@pytest.fixture(scope="session")
def bench_module():
    """`bench_module("architectures")`: a script of bench/ imported as a module (its siblings importable while it
    loads), for tests of a benchmark's own logic."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")

    def load(name: str):
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)

    return load
