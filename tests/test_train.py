"""The training loop: it learns a planted dictionary, resumes bit-exactly, and data-parallel equals one process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig, TrainConfig
from saelab.training import lr_at, train


def planted_data(n_rows=8192, d=32, n_true=64, k_true=3, seed=0):
    """Activations that are sparse sums of unit directions: a TopK SAE can reconstruct them almost exactly."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_true, generator=g)[:k_true] for _ in range(n_rows)])
    coef = torch.rand(n_rows, k_true, generator=g) * 2 + 0.5
    return (coef[..., None] * dictionary[idx]).sum(1) + 0.3


def small_cfg(**kw):
    base = dict(sae=SAEConfig(n_latents=128, k=4), tokens=256 * 60, batch_size=256, lr=3e-3, lr_warmup_steps=5,
                log_every=5, checkpoint_every=20, eval_tokens=0)
    base.update(kw)
    return TrainConfig(**base)


def test_learns_planted_dictionary(tmp_path):
    x = planted_data()
    res = train(small_cfg(tokens=256 * 150), InMemoryActivations(x, 256, seed=0), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["fvu"] > 3 * rows[-1]["fvu"]
    assert rows[-1]["fvu"] < 0.1
    assert abs(rows[-1]["l0"] - 4) < 0.5
    assert (tmp_path / "run" / "sae" / "sae_weights.safetensors").exists()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_lr_schedule():
    cfg = small_cfg(tokens=100 * 256, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert lr_at(0, 100, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(50, 100, cfg, 1.0) == 1.0
    assert lr_at(90, 100, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, cfg, 1.0) == pytest.approx(0.05)


class Interrupted(Exception):
    pass


class DiesAfter(InMemoryActivations):
    """A source that raises after `n` batches: a simulated kill mid-run."""

    def __init__(self, *a, n, **kw):
        super().__init__(*a, **kw)
        self.n = n

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if i == self.n:
                raise Interrupted
            yield b


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "sae" / "sae_weights.safetensors"))


def test_resume_is_bit_exact_after_an_interruption(tmp_path):
    x = planted_data(n_rows=4096)
    dead = dict(dead_tokens=256 * 8)  # latents do die in this run, so AuxK and its counters are exercised
    train(small_cfg(**dead), InMemoryActivations(x, 256, seed=3), tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train(small_cfg(**dead), DiesAfter(x, 256, seed=3, n=47), tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "sae").exists()
    train(small_cfg(resume=True, **dead), InMemoryActivations(x, 256, seed=3), tmp_path / "b", progress=False)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["fvu"] for r in log_a] == [json.loads(r)["fvu"] for r in log_b]


def test_resumed_optimizer_state_keeps_each_parameters_layout(tmp_path):
    """A checkpoint file holds tensors row-major; Adam's moments of the column-major W_enc come back column-major
    (a mismatched layout sent every resumed step down the optimizer's strided path), with the same values."""
    from saelab.sae.sae import SparseAutoencoder
    from saelab.training.checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint

    sae = SparseAutoencoder(SAEConfig(d_in=8, n_latents=32, k=4))
    assert not sae.W_enc.is_contiguous()  # the layout this test is about
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, meta = optimizer_to_flat(opt)
    tensors, _ = load_checkpoint(save_checkpoint(tmp_path, 1, tensors, {}))
    resumed = torch.optim.Adam(sae.parameters(), lr=1e-3)
    optimizer_from_flat(resumed, tensors, meta)
    for p in sae.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[p][name].stride() == p.stride(), name
            assert torch.equal(resumed.state[p][name], opt.state[p][name]), name


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import planted_data, small_cfg
    from saelab.activations.in_memory import InMemoryActivations
    from saelab.training import train
    torch.set_num_threads(1)
    x = planted_data(n_rows=4096)
    cfg = small_cfg(tokens=256 * 400, checkpoint_every=10, resume={resume})
    train(cfg, InMemoryActivations(x, 256, seed=5), {run!r}, progress=False)
""")


@pytest.mark.slow
def test_resume_is_bit_exact_after_sigkill(tmp_path):
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def script(run, resume):
        return [sys.executable, "-c", SCRIPT.format(tests=tests, run=str(run), resume=resume)]

    subprocess.run(script(tmp_path / "a", False), check=True, env=env)
    proc = subprocess.Popen(script(tmp_path / "b", False), env=env)
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpts.glob("step-*"))) < 1:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "sae").exists(), "the run finished before it could be killed"
    subprocess.run(script(tmp_path / "b", True), check=True, env=env)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


DIST_SCRIPT = textwrap.dedent("""
    import os, sys, json, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_train import planted_data, small_cfg
    from saelab.activations.in_memory import InMemoryActivations
    from saelab.training import train
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = planted_data(n_rows=4096)
    cfg = small_cfg(tokens=512 * 30, batch_size=256, dead_tokens=10**9)
    train(cfg, InMemoryActivations(x, 256, seed=7, rank=rank, world_size=world), {run!r}, progress=False)
    dist.barrier()  # leave together: a rank exiting while its peer still saves can abort gloo at teardown
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_data_parallel_equals_single_process(tmp_path):
    tests = os.path.dirname(__file__)
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT.format(tests=tests, run=str(tmp_path / "ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    str(script)], check=True, env=env, timeout=600)
    # one process, the same global batches: InMemoryActivations with world_size=1 and batch 512 yields the
    # union of the two ranks' 256-row halves, in the same order
    x = planted_data(n_rows=4096)
    cfg = small_cfg(tokens=512 * 30, batch_size=512, dead_tokens=10**9)
    train(cfg, InMemoryActivations(x, 512, seed=7), tmp_path / "single", progress=False)
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
