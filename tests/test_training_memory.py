"""The memory check before the first training step (`saelab.training.memory`): its state bound against the bytes
an SAE and its Adam optimizer really hold after a step, its pre-activation bound by hand, and the refusals."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.sae import SparseAutoencoder
from saelab.training import memory
from saelab.training.memory import check_step_fits, state_bytes, step_bytes


def held_bytes(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, gradients and the optimizer's per-parameter tensors (Adam's step counters aside)."""
    tensors = [p for p in sae.parameters()] + [p.grad for p in sae.parameters() if p.grad is not None]
    tensors += [v for state in opt.state.values() for name, v in state.items() if name != "step"]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("d_out,skip", [(0, False), (6, False), (6, True)])
def test_state_bound_is_what_a_step_holds(d_out, skip):
    cfg = SAEConfig(d_in=10, n_latents=64, k=4, d_out=d_out, skip=skip,
                    target_hook="blocks.0.hook_mlp_out" if d_out else "")
    sae = SparseAutoencoder(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(16, 10)
    target = torch.randn(16, d_out) if d_out else None
    out = sae(x, target=target) if d_out else sae(x)
    out.losses["loss"].backward()
    opt.step()
    assert state_bytes(10, d_out, 64, skip) == held_bytes(sae, opt)


def test_pre_activation_bound_by_hand():
    # an SAE of d 4, n 8: params 8·(4 + 4 + 1) + 4 = 76, ×4 copies ×4 bytes = 1216; dense B 3: 2·3·8·4 = 192
    assert step_bytes(4, 0, 8, 3, 0) == 1216 + 192
    assert step_bytes(4, 0, 8, 3, 2) == 1216 + 2 * 3 * 2 * 4  # streaming: one [B, chunk] block
    assert step_bytes(4, 0, 8, 3, 100) == 1216 + 192  # a block wider than n is the whole matrix
    assert step_bytes(4, 0, 8, 3, 0, element_size=2) == (1216 + 192) // 2
    assert step_bytes(4, 2, 8, 3, 0, skip=True) == 70 * 16 + 192  # a skip-transcoder 4 → 2: 8·7 + 4 + 2 + 8 params


def refusal(monkeypatch, free: int, **cfg) -> ConfigError | None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    try:
        batch, shards = cfg.pop("batch", 4096), cfg.pop("shards", 1)
        check_step_fits(SAEConfig(d_in=256, **cfg), batch, shards, "cpu")
    except ConfigError as e:
        return e
    return None


def test_refusals_say_what_to_change(monkeypatch):
    n = 2 ** 20  # state 4·2^20·513·4 B = 8.0 GiB; dense [4096, n] pre-activations 2·16 GiB
    e = refusal(monkeypatch, 20 * 2 ** 30, n_latents=n, k=32, encoder_chunk=0)
    assert e is not None and "1,048,576 latents at batch 4,096" in e.message and "20.0 GiB free" in e.message
    assert "--encoder-chunk auto" in e.hint
    assert refusal(monkeypatch, 20 * 2 ** 30, n_latents=n, k=32, encoder_chunk=16384) is None  # 8.5 GiB
    e = refusal(monkeypatch, 20 * 2 ** 30, n_latents=n, architecture="relu", encoder_chunk=0)
    assert e is not None and "--encoder-chunk" not in e.hint and "--batch-size" in e.hint  # relu cannot stream
    e = refusal(monkeypatch, 6 * 2 ** 30, n_latents=n, k=32, encoder_chunk=16384)
    assert e is not None and "--shard-latents" in e.hint  # the state alone does not fit
    # under --shard-latents 2 a process holds half the latents: 4.0 GiB of state, 0.25 GiB of blocks
    assert refusal(monkeypatch, 6 * 2 ** 30, n_latents=n, k=32, encoder_chunk=16384, shards=2) is None
    assert refusal(monkeypatch, None, n_latents=n, k=32, encoder_chunk=0) is None  # unknown: not refused


def test_available_bytes_reads_the_machine():
    free = memory.available_bytes("cpu")
    assert free is None or 0 < free < 2 ** 50
