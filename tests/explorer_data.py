"""A tiny real run for the explorer's tests: an SAE on the reference model, its dashboard bundle and a few metrics;
and a `saelab explore` server on a free localhost port for the tests that talk to a real one.

Built with the dashboard's own builder on held-out stdlib rows. Latent DEAD gets a very negative encoder bias (it
never enters the top k), latent DENSE a very positive one (it is in every token's top k), the rest are a random
tied init: a normal mix of sparse latents.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

N_LATENTS = 48
DEAD = 3
DENSE = 5
HOOK = "blocks.1.hook_resid_pre"


def make_tiny_run(root: Path, tokens: int = 1200, context_size: int = 32, n_latents: int = N_LATENTS,
                  architecture: str = "topk") -> Path:
    """root/tiny: sae/, metrics.jsonl, eval/probing_demo.json and dashboard/ (the bundle). Returns the run folder.
    architecture "abstopk" (signed codes): DEAD's encoder column is zero (|pre| = 0 never ranks in the top k) and
    DENSE's bias very negative (in every token's top k, always negative)."""
    import torch

    from saelab.config import SAEConfig
    from saelab.dashboard.build import DashboardSettings
    from saelab.dashboard.run import build_run_bundle
    from saelab.sae import SparseAutoencoder

    run = Path(root) / "tiny"
    sae = SparseAutoencoder(SAEConfig(d_in=256, n_latents=n_latents, k=4, hook_name=HOOK, normalize="none",
                                      model_name="reference", architecture=architecture))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        if architecture == "abstopk":
            sae.W_enc[:, DEAD] = 0
            sae.b_enc[DENSE] = -1e3
        else:
            sae.b_enc[DEAD] = -1e4
            sae.b_enc[DENSE] = 1e3
    sae.save(run / "sae")
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step * 10, "tokens": step * 4096, "fvu": 1.0 / step, "l0": 4.0,
                                "dead_pct": 10.0 / step}) + "\n")
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "probing_demo.json").write_text(json.dumps(
        [{"latent": i, "auc": 0.5 + i / (2 * n_latents)} for i in range(0, n_latents, 2)]))
    settings = DashboardSettings(n_top=6, n_intervals=4, per_interval=2, n_random=3, bins=12, n_logits=6,
                                 n_neighbours=5, n_coact=5, map_method="pca", segment_rows=16, batch_rows=8,
                                 latents_per_row_group=8)
    build_run_bundle(run, tokens=tokens, context_size=context_size, settings=settings, device="cpu",
                     progress=False)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def explore_server(command: list[str], log: Path, **popen):
    """Run `command` (a `saelab explore …` line; `--port P` is appended) and yield its URL once Streamlit's health
    check answers; stop it afterwards. The test fails with the server's log if it exits or is not up within 180 s
    (CI and shared machines can be slow), and if the log holds a traceback."""
    port = free_port()
    with open(log, "w+") as out:
        proc = subprocess.Popen([*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, **popen)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    if urllib.request.urlopen(url + "/_stcore/health", timeout=5).read() == b"ok":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    out.seek(0)
                    pytest.fail(f"saelab explore did not start:\n{out.read()}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.seek(0)
            assert "Traceback" not in out.read()
