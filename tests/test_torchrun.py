"""`torchrun --standalone --nproc-per-node 2 -m saelab.cli train --cache DIR …` (the README's command) on the CPU:
the two processes form one gloo group and train one SAE on global batches of 2 × batch_size rows, equal (to float
tolerance) to one process fed the same global batches; rank 0 alone writes, prints and evaluates. A bad cache, a
failure or a hang on one rank ends the run with one clear line in bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main

HOOK = "blocks.2.hook_resid_pre"  # the reference model's middle residual stream
T = 32
TRAIN = ["--n-latents", "256", "--k", "8", "--batch-size", "64", "--tokens", str(64 * 2 * 16),
         "--checkpoint-every", "8", "--no-progress"]


def torchrun(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (the venv's torchrun), output captured."""
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*cmd, "--standalone", "--nproc-per-node", "2", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("saelab train: error:")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_model):
    """A 4-shard cache (32 rows of 32 tokens) and a 1-shard one too small to split between two ranks."""
    from saelab.activations import write_cache
    from saelab.config import CacheConfig

    root = tmp_path_factory.mktemp("torchrun")
    big = write_cache(CacheConfig(hooks=[HOOK], out=str(root / "cache"), tokens=32 * T, context_size=T,
                                  batch_rows=4, shard_rows=8), progress=False, model=reference_model)
    small = write_cache(CacheConfig(hooks=[HOOK], out=str(root / "small"), tokens=8 * T, context_size=T,
                                    batch_rows=4, shard_rows=8), progress=False, model=reference_model)
    return Path(big), Path(small)


class GlobalBatches:
    """One process's view of a two-rank run: rank 0's and rank 1's batches, concatenated in rank order (what the
    two ranks' gradients average over, and what the first-batch initialisation gathers)."""

    def __init__(self, path: Path, batch_size: int, seed: int):
        from saelab.activations import ActivationCache

        self.ranks = [ActivationCache(path, hook_name=HOOK, batch_size=batch_size, seed=seed, rank=r, world_size=2)
                      for r in range(2)]

    def stats(self):
        return self.ranks[0].stats()  # the whole cache's, the same on every rank

    def __iter__(self):
        from saelab.activations.batch import Batch

        for parts in zip(*self.ranks):
            yield Batch(acts=torch.cat([p.acts for p in parts]), grads=None,
                        tokens=torch.cat([p.tokens for p in parts]), positions=torch.cat([p.positions for p in parts]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [
    [],
    # batch-level selections cut the global batch (one threshold over both ranks' streamed blocks)
    ["--arch", "batchtopk", "--encoder-chunk", "64"],
    # each latent's top m_i of the global batch; the cache repeats a token after the same prefix on both ranks, so
    # some latents' m_i-th place is a tie between the ranks' rows, which go to rank 0's first as in one process
    ["--arch", "feature_choice", "--encoder-chunk", "64"],
    ["--arch", "mutual"],  # BatchTopK's code on the dense encoder
], ids=["topk", "batchtopk-streaming", "feature_choice-streaming", "mutual"])
def test_torchrun_trains_one_sae_as_one_process_with_the_global_batch(cache, tmp_path, arch):
    from saelab.config import TrainConfig, load_config
    from saelab.training import train

    big, _ = cache
    out = tmp_path / "ddp"
    proc = torchrun("-m", "saelab.cli", "train", "--cache", str(big), "--out", str(out), *TRAIN, *arch,
                    "--eval-tokens", "1k")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 alone printed the summary and ran the closing evaluation
    printed = proc.stdout.splitlines()
    assert [line.startswith("trained ") for line in printed].count(True) == 1, proc.stdout
    assert [line.startswith("wrote ") and line.endswith("eval/core.json") for line in printed].count(True) == 1
    assert (out / "eval" / "core.json").exists()
    # one metrics stream, counting global tokens (2 ranks × 64 rows a step)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 16]
    assert rows[-1]["tokens"] == 64 * 2 * 16
    saved = json.loads((out / "sae" / "saelab.json").read_text())["training"]
    assert saved["steps"] == 16 and saved["tokens"] == 64 * 2 * 16

    # one process, batch_size 128, fed the two ranks' batches side by side
    cfg = load_config(TrainConfig, out / "config.yaml", {"batch_size": 128})
    single = train(cfg, GlobalBatches(big, 64, cfg.seed), tmp_path / "single", progress=False)
    ddp = load_file(str(out / "sae" / "sae_weights.safetensors"))
    ref = load_file(str(tmp_path / "single" / "sae" / "sae_weights.safetensors"))
    assert ddp.keys() == ref.keys()
    for name in ddp:
        torch.testing.assert_close(ddp[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)
    # what each rank trained without a process group (the whole cache, alone, 64 rows a step) is another SAE
    from saelab.activations import ActivationCache

    alone = train(load_config(TrainConfig, out / "config.yaml", {}),
                  ActivationCache(big, hook_name=HOOK, batch_size=64, seed=cfg.seed), tmp_path / "alone",
                  progress=False)
    assert not torch.allclose(alone.sae.W_dec, single.sae.W_dec, atol=1e-3)


@pytest.mark.slow
def test_a_cache_too_small_for_the_ranks_is_one_line_and_exit_2(cache, tmp_path):
    _, small = cache
    out = tmp_path / "run"
    proc = torchrun("-m", "saelab.cli", "train", "--cache", str(small), "--out", str(out), *TRAIN,
                    "--eval-tokens", "0", timeout=180)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "rank 1 of 2 gets no rows" in lines[0] and str(small) in lines[0]
    assert "hint: write a larger cache" in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # the processes' exit status, in torchrun's summary
    assert proc.returncode != 0 and not out.exists()


FAILING = textwrap.dedent("""
    import os, sys, time
    from saelab.errors import DataError
    from saelab.training import trainer

    step_of = trainer.SAERun.step

    def step(self, step, x, grad, target=None):  # rank 1 {how} at step 3; rank 0 waits in the gradient all-reduce
        if step == 3 and os.environ["RANK"] == "1":
            if "{how}" == "fails":
                raise DataError("a planted failure")
            time.sleep(3600)
        return step_of(self, step, x, grad, target)

    trainer.SAERun.step = step
    from saelab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fails", "hangs"])
def test_a_failure_on_one_rank_ends_the_run_in_bounded_time(cache, tmp_path, how):
    big, _ = cache
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(how=how))
    # without the collective timeout a hung rank would hold rank 0 for SAELAB_DIST_TIMEOUT's default (10 minutes),
    # past this test's subprocess timeout
    proc = torchrun(str(script), "train", "--cache", str(big), "--out", str(tmp_path / "run"), *TRAIN,
                    "--eval-tokens", "0", env={"SAELAB_DIST_TIMEOUT": "10"}, timeout=240)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert "internal error" not in proc.stderr, proc.stderr[-4000:]
    if how == "fails":  # rank 1 says why; rank 0, if torchrun has not stopped it first, that it lost rank 1
        assert any(line.endswith("rank 1 of 2: a planted failure") for line in lines), proc.stderr[-4000:]
        assert all("a planted failure" in line or "rank 0 of 2: lost the other processes" in line
                   for line in lines), lines
    else:  # rank 0 gives up waiting: one line; torchrun then stops the hung rank
        assert len(lines) == 1 and "rank 0 of 2: lost the other processes" in lines[0], proc.stderr[-4000:]
        assert "Timed out" in lines[0] and "SAELAB_DIST_TIMEOUT" in proc.stderr


def test_a_bad_collective_timeout_is_one_line_before_any_process_group(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SAELAB_DIST_TIMEOUT": "soon"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--tokens", "1k"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["saelab train: error: SAELAB_DIST_TIMEOUT='soon': must be a number of seconds > 0"]
    assert list(tmp_path.iterdir()) == []


def test_only_rank_0_reports_an_error_every_rank_shares(tmp_path, monkeypatch, capsys):
    """Under torchrun a bad flag is every rank's: rank 1 exits 2 without a word, rank 0 says it once."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--tokens", "0"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--tokens", "0"]) == 2
    assert len(error_lines(capsys.readouterr().err)) == 1


def test_without_torchrun_there_is_no_process_group():
    """A notebook's `saelab.train` (or a plain `saelab train`) is one process: nothing is initialised."""
    import torch.distributed as dist

    from saelab import distributed

    assert not distributed.launched() and distributed.is_main()
    with distributed.process_group("cpu"):
        assert not dist.is_initialized() and distributed.rank_world() == (0, 1)
    with distributed.all_or_none():
        pass
