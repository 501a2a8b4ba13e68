"""Whether a training step can fit the device: a lower bound on its memory, checked before the first step, so that
a dense encoder at a width it cannot hold is refused with a clear message instead of being killed for memory (on
a CPU, the kernel's OOM killer ends the process without a word) part-way through its first step."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.config import SAEConfig
from saelab.errors import ConfigError

# The dense step holds the [B, n] pre-activations and, while it selects, a working copy of them (ATen's top-k keeps
# each row in its own queue; ReLU-type codes keep the dense code for backward): two [B, n] matrices at least.
DENSE_MATRICES = 2
# Adam: the parameters, their gradients and two moments.
STATE_COPIES = 4


def state_bytes(d_in: int, d_out: int, n_latents: int, skip: bool, element_size: int = 4) -> int:
    """Parameters, gradients and Adam's moments of an SAE (d_out 0) or a transcoder (d_out wide, with its own input
    bias b_in and, with `skip`, W_skip)."""
    biases = d_in if not d_out else d_in + d_out
    d_out = d_out or d_in
    params = n_latents * (d_in + d_out + 1) + biases + (d_in * d_out if skip else 0)
    return STATE_COPIES * params * element_size


def step_bytes(d_in: int, d_out: int, n_latents: int, batch: int, encoder_chunk: int, skip: bool = False,
               element_size: int = 4) -> int:
    """A lower bound on one training step's memory: the state (`state_bytes`: d_out 0 for an SAE), and the
    pre-activations the encoder holds at once ([batch, n] dense; [batch, chunk] streaming, a block and its running
    top-k)."""
    held = n_latents if encoder_chunk <= 0 else min(encoder_chunk, n_latents)
    return state_bytes(d_in, d_out, n_latents, skip, element_size) + DENSE_MATRICES * batch * held * element_size


def available_bytes(device: str | torch.device) -> int | None:
    """Memory this process can still take on `device`: MemAvailable on a CPU (Linux), the free memory of a GPU;
    None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_step_fits(sae: SAEConfig, batch: int, shards: int, device: str | torch.device) -> None:
    """A `ConfigError` when the lower bound of a step of this SAE (its d_in, d_out known) at `batch` rows per
    process exceeds what `device` has free; under --shard-latents a process holds n / `shards` of the latents."""
    from saelab.sae.architectures import get_architecture  # the registry, imported when first needed

    n_latents, streams = sae.n_latents // max(shards, 1), get_architecture(sae.architecture).streams
    element_size = getattr(torch, sae.dtype).itemsize
    d_out, chunk = sae.d_out, sae.encoder_chunk
    need = step_bytes(sae.d_in, d_out, n_latents, batch, chunk, sae.skip, element_size)
    free = available_bytes(device)
    if free is None or need <= free:
        return
    gib = 2 ** 30
    state = state_bytes(sae.d_in, d_out, n_latents, sae.skip, element_size)
    what = (f"a training step of {n_latents:,} latents at batch {batch:,} needs at least {need / gib:.1f} GiB "
            f"({state / gib:.1f} GiB parameters, gradients and Adam state, {(need - state) / gib:.1f} GiB "
            f"pre-activations), but {device} has {free / gib:.1f} GiB free")
    if state > free:
        hint = "split the latents over processes (torchrun … --shard-latents N), or train a narrower SAE"
    elif chunk <= 0 and streams:
        hint = "stream the encoder (--encoder-chunk auto, or a number of latents such as 16k), or a smaller --batch-size"
    else:
        hint = "a smaller --batch-size" + (" or --encoder-chunk" if streams else "")
    raise ConfigError(what, hint=hint)
