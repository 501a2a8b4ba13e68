"""Latent-parallel training (`shard_latents`, saelab.training.latent_parallel): gloo processes, each holding a shard of
the SAE's latents, train what one process with the whole SAE trains on the same global batches: the same losses at
every step and the same final parameters (to float rounding), AuxK included; a run interrupted after a checkpoint
resumes bit for bit; the finished SAE is one ordinary folder. Each launch trains several runs in one process group,
since a torchrun start costs seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saelab.activations.in_memory import InMemoryActivations
from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.sae.latent_shard import LatentShard
from saelab.training import train
from saelab.training.latent_parallel import check_layout

from test_train import final_weights, planted_data, small_cfg

TESTS = os.path.dirname(__file__)
ROWS = 4096

# name -> (SAE settings, train settings). Latents die (dead_tokens: one step), so AuxK runs: over a few dead latents
# (its dense path) in "topk" and "batchtopk", over many (k_aux 2: its sparse path) with the streaming encoder
RUNS = {
    "topk": (dict(architecture="topk", n_latents=256, k=4), dict(dead_tokens=512)),
    "topk_multi_stream": (dict(architecture="topk", n_latents=256, k=2, k_aux=2, encoder_chunk=32,
                               options={"multi_topk": True, "relu_before_topk": True}), dict(dead_tokens=512)),
    "batchtopk": (dict(architecture="batchtopk", n_latents=256, k=4), dict(dead_tokens=512)),
}


def config(name: str, batch: int, **kw):
    sae, train_kw = RUNS[name]
    return small_cfg(sae=SAEConfig(**sae), tokens=512 * 24, batch_size=batch, log_every=1, checkpoint_every=10,
                     **train_kw, **kw)


def test_a_shard_draws_its_rows_of_the_whole_saes_random_init():
    """Each shard's init is exactly its rows of one process's `torch.randn(n, d)` (drawn in blocks, the last one short),
    and it leaves the generator where the whole draw does."""
    from saelab.sae import latent_shard

    for n, d, shards in [(256, 32, 2), (8200, 3, 4), (4110, 5, 2)]:
        whole = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
        for index in range(shards):
            gen = torch.Generator().manual_seed(3)
            rows = LatentShard(index, shards, n, 1).init_rows(d, gen)
            size = n // shards
            assert torch.equal(rows, whole[index * size:(index + 1) * size]), (n, d, index)
            after = torch.rand(4, generator=gen)
            gen = torch.Generator().manual_seed(3)
            torch.randn(n, d, generator=gen)
            assert torch.equal(after, torch.rand(4, generator=gen))
    assert latent_shard.INIT_BLOCK_ROWS % 16 == 0


def simulated_choose(keys: torch.Tensor, k: int, shards: int):
    """`LatentShard.choose` of every shard of the [B, n] `keys`, each shard offering its top-m, with the all-gather
    played by a stand-in: → the chosen latents [B, k] (as a set per row), put together from what each shard keeps."""
    B, n = keys.shape
    size = n // shards
    cands = []
    for s in range(shards):
        top = keys[:, s * size:(s + 1) * size].topk(min(k, size), dim=1)
        cands.append((top.values, top.indices))
    chosen = [[] for _ in range(B)]
    for s in range(shards):
        shard = LatentShard(s, shards, n, 1)
        padded = [torch.cat([v, v.new_full((B, k - v.shape[1]), float("-inf"))], 1) for v, _ in cands]
        ids = [torch.cat([i + t * size, i.new_full((B, k - i.shape[1]), n)], 1) for t, (_, i) in enumerate(cands)]
        gathered = iter([torch.cat(padded, 1), torch.cat(ids, 1)])
        shard._gather = lambda t: next(gathered)
        pos, mine = shard.choose(*cands[s], k)
        latents = cands[s][1].gather(1, pos) + s * size
        for b in range(B):
            chosen[b] += latents[b][mine[b]].tolist()
    return chosen


def test_the_global_choice_is_the_top_k_of_the_whole_row_ties_to_the_lower_latent():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 64, generator=g)
    for shards, k in [(2, 5), (4, 3), (4, 16), (8, 8)]:  # k above a shard's width too (4 × 16, k 16 ... 8 × 8)
        chosen = simulated_choose(keys, k, shards)
        want = keys.topk(k, dim=1).indices
        for b in range(keys.shape[0]):
            assert sorted(chosen[b]) == sorted(want[b].tolist()), (shards, k, b)
    tied = torch.zeros(3, 16)
    tied[:, 3] = 2.0  # one clear winner, then 15 equal values: k distinct latents of the top-k's values
    for shards in (2, 4):
        for row in simulated_choose(tied, 4, shards):
            assert len(set(row)) == 4 and 3 in row


def test_equal_candidates_go_to_the_lower_latent():
    """Of the candidates offered (latents 0-7 are shard 0's, 8-15 shard 1's), equal values are ranked by latent."""
    cases = [  # (each shard's candidate values and local latents, k = 2) → what each shard keeps
        (([[5.0, -1.0]], [[0, 2]]), ([[-1.0, -2.0]], [[1, 7]]), [0, 2], []),  # latent 2 before 9
        (([[5.0, -3.0]], [[0, 2]]), ([[-1.0, -1.0]], [[7, 1]]), [0], [1]),  # 9 before 15, within a shard
    ]
    for (v0, l0), (v1, l1), keep0, keep1 in cases:
        keys, latents = [torch.tensor(v0), torch.tensor(v1)], [torch.tensor(l0), torch.tensor(l1)]
        for index, want in ((0, keep0), (1, keep1)):
            shard = LatentShard(index, 2, 16, 1)
            gathered = iter([torch.cat(keys, 1), torch.cat([latents[0], latents[1] + 8], 1)])
            shard._gather = lambda t: next(gathered)
            pos, mine = shard.choose(keys[index], latents[index], 2)
            assert sorted(latents[index].gather(1, pos)[mine].tolist()) == want


def test_a_layout_the_launch_cannot_hold_is_refused():
    check_layout(0, 1), check_layout(1, 1), check_layout(2, 4), check_layout(4, 4)  # off, or dividing the world
    with pytest.raises(ConfigError, match="this is one process"):
        check_layout(2, 1)
    with pytest.raises(ConfigError, match="shard_latents 2 does not divide the 3 processes"):
        check_layout(2, 3)


SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_latent_parallel import config, ROWS
    from test_train import DiesAfter, Interrupted, planted_data
    from saelab.activations.in_memory import InMemoryActivations
    from saelab.training import train
    from saelab.training.latent_parallel import data_position
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    shards = {shards}
    batch, batches = data_position(shards)
    x = planted_data(n_rows=ROWS)
    out = Path({out!r})
    for name in {names!r}:
        cfg = config(name, 512 // batches, shard_latents=shards)
        src = lambda cls=InMemoryActivations, **kw: cls(x, 512 // batches, seed=7, rank=batch, world_size=batches, **kw)
        res = train(cfg, src(), out / name, progress=False)
        torch.save({{n: t.detach() for n, t in res.sae.state_dict().items()}},
                   out / f"{{name}}-rank{{dist.get_rank()}}.pt")  # each rank's own shard (rank 0: the whole SAE)
        if {resume}:  # killed after the checkpoint of step 10, then resumed
            try:
                train(cfg, src(DiesAfter, n=13), out / (name + "-resumed"), progress=False)
            except Interrupted:
                pass
            assert not (out / (name + "-resumed") / "sae").exists()
            train(config(name, 512 // batches, shard_latents=shards, resume=True), src(), out / (name + "-resumed"),
                  progress=False)
    dist.barrier()
    dist.destroy_process_group()
""")


def launch(tmp_path: Path, procs: int, shards: int, names: list[str], resume: bool = False) -> Path:
    out = tmp_path / f"shards{shards}-of-{procs}"
    script = tmp_path / f"latent_parallel_{procs}_{shards}.py"
    script.write_text(SCRIPT.format(tests=TESTS, out=str(out), shards=shards, names=names, resume=resume))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAELAB_DIST_TIMEOUT": "120"}
    subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={procs}", str(script)], check=True, env=env,
                   timeout=600)
    return out


def single(tmp_path: Path, name: str) -> Path:
    """One process with the whole SAE, on the global batches of 512 rows."""
    run = tmp_path / "single" / name
    train(config(name, 512), InMemoryActivations(planted_data(n_rows=ROWS), 512, seed=7), run, progress=False)
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(sharded: Path, one: Path, batches: int = 1) -> None:
    """Losses at every step and the final SAE of a latent-parallel run equal one process's. With several batches a
    step, rank 0 logs its own batch's losses (as data parallelism does): then the dead latents (counted over every
    batch) and the final SAE are compared."""
    a, b = metrics(sharded), metrics(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(b) + 1))
    assert any(r.get("auxk", 0) > 0 for r in b), "no latent died: AuxK was not exercised"
    keys = ("loss", "fvu", "auxk", "multi_topk_fvu", "l0", "dead_pct", "lr") if batches == 1 else ("dead_pct", "lr")
    for ra, rb in zip(a, b):
        for key in keys:
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=2e-4, abs=1e-6), (ra["step"], key)
    wa, wb = final_weights(sharded), final_weights(one)
    assert wa.keys() == wb.keys()
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4, msg=name)
    ca, cb = (json.loads((run / "sae" / "cfg.json").read_text()) for run in (sharded, one))
    assert ca == cb  # the same SAELens config: one ordinary folder


@pytest.mark.slow
def test_two_shards_train_what_one_process_trains_and_resume_bit_for_bit(tmp_path):
    names = list(RUNS)
    out = launch(tmp_path, procs=2, shards=2, names=names, resume=True)
    for name in names:
        assert_same_training(out / name, single(tmp_path, name))
        # each rank's shard is its slice of the whole SAE, and b_dec, replicated, the same bits on both ranks
        whole, shard1 = (torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1))
        torch.testing.assert_close(shard1["W_dec"], whole["W_dec"][128:], atol=0, rtol=0)
        torch.testing.assert_close(shard1["W_enc"], whole["W_enc"][:, 128:], atol=0, rtol=0)
        assert torch.equal(shard1["b_dec"], whole["b_dec"])
        # killed after step 10's checkpoint (two shard files) and resumed: the same SAE, bit for bit
        resumed = out / f"{name}-resumed"
        steps = sorted((resumed / "checkpoints").glob("step-*"))
        assert steps and all(sorted(p.name for p in step.iterdir()) ==
                             ["state.json", "state.safetensors", "state.shard-1.safetensors"] for step in steps)
        a, b = final_weights(out / name), final_weights(resumed)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        assert [r["loss"] for r in metrics(out / name)] == [r["loss"] for r in metrics(resumed)]


@pytest.mark.slow
def test_a_grid_of_two_batches_by_two_shards_trains_what_one_process_trains(tmp_path):
    out = launch(tmp_path, procs=4, shards=2, names=["topk", "batchtopk"])
    for name in ("topk", "batchtopk"):
        assert_same_training(out / name, single(tmp_path, name), batches=2)
