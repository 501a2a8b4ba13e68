"""Data parallelism under `torchrun`: join the process group that torchrun's environment describes, and make a
failure on one process end every process with one clear line instead of a hang.

`torchrun --nproc-per-node N -m saelab.cli train --cache DIR …` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in their environment; `process_group(device)` joins them (gloo on the CPU,
NCCL for CUDA tensors with each process on cuda:LOCAL_RANK) and leaves at the end. Without that environment (a
notebook, a plain `saelab train`) it does nothing: one process, world size 1. Collectives give up after
SAELAB_DIST_TIMEOUT seconds (default 600), so a process that hangs cannot hold the others forever.

Errors: a step every rank takes with the same inputs (checking the settings, opening the data) runs under
`all_or_none()`: if it fails on any rank it fails on every rank with the first failing rank's error, and only rank
0 prints it. An error that is one rank's own (raised during training) is printed by that rank, prefixed with its
rank. The other ranks then find their peer gone at the next collective; rank 0 says so in one line (`reports`
decides who prints what) and torchrun stops the rest.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from saelab.errors import ConfigError, SaelabError, TrainingError

TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # long enough for rank 0 to write a run's cache or a large checkpoint alone


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 of a torchrun launch, or a lone process: the one that writes, prints and evaluates."""
    return not launched() or int(os.environ["RANK"]) == 0


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: must be a number of seconds > 0",
                          hint=f"unset it for the default ({DEFAULT_TIMEOUT_S:.0f} s)")
    return value


def rank_device(device: str) -> str:
    """The device this process uses for a run on `device`: under torchrun, 'cuda' is cuda:LOCAL_RANK."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _check_device(device: str, world: int) -> None:
    """A CUDA run under torchrun: one GPU per process on this machine."""
    if not device.startswith("cuda"):
        return
    if device != "cuda" and world > 1:
        raise ConfigError(f"--device {device} under torchrun: every process would use that one GPU",
                          hint="pass --device cuda: each process takes cuda:LOCAL_RANK")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not torch.cuda.is_available() or torch.cuda.device_count() < local_world:
        raise ConfigError(f"--device cuda under torchrun: {local_world} processes on this machine but "
                          f"{torch.cuda.device_count()} CUDA devices",
                          hint="start at most one process per GPU (--nproc-per-node), or train on --device cpu")


@contextmanager
def process_group(device: str):
    """Under torchrun: join the process group for the length of the block (a run on `device`: 'cpu', 'cuda'), then
    leave it together. An error inside the block leaves at once (the others find out at their next collective);
    a collective that failed because another process stopped or hung becomes a `TrainingError`. Elsewhere:
    nothing."""
    if not launched():
        yield
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = timeout_s()
    _check_device(device, world)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the SAE's tensors, gloo for the few small CPU ones
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        yield
        dist.barrier()  # leave together: a rank that tears down while a peer still talks to it can abort the peer
    except SaelabError as e:
        if not getattr(e, "everywhere", False) and world > 1:  # this rank's own: say which rank
            e.args = (f"rank {rank} of {world}: {e.message}", *e.args[1:])
            e.rank_local = True
        _abort()
        raise
    except Exception as e:
        _abort()
        if not _collective_failure(e):
            raise
        raise TrainingError(f"rank {rank} of {world}: lost the other processes of the run ({_first_sentence(e)})",
                            hint=f"another process stopped or hung: its own error is printed above, or in "
                                 f"torchrun's summary; collectives wait {TIMEOUT_ENV} seconds "
                                 f"(now {timeout:g})") from None
    except BaseException:
        _abort()
        raise
    dist.destroy_process_group()


def _collective_failure(e: BaseException) -> bool:
    """A collective that failed because a peer is gone or silent (gloo raises a plain RuntimeError naming itself)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def _first_sentence(e: BaseException) -> str:
    """'Connection closed by peer [127.0.0.1]:25296' from gloo's '[…/pair.cc:553] Connection closed by peer
    [127.0.0.1]:25296. This is typically caused by …'."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]).split(". ")[0].rstrip(".")


def _abort() -> None:
    """Leave the group without waiting for the other processes (they may be the reason for leaving)."""
    if dist.is_initialized():
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 -- leaving anyway; the process is about to exit with the real error
            pass


@contextmanager
def all_or_none():
    """A step every rank takes (checking the inputs, writing or opening the data): if it raises a `SaelabError` on
    any rank, every rank raises the first failing rank's error once all have finished the step (a rank that
    failed alone does not leave the others waiting for it); rank 0 prints it. Without a process group: nothing."""
    rank, world = rank_world()
    if world == 1:
        yield
        return
    own = None
    try:
        yield
    except SaelabError as e:
        own = e
    errors: list = [None] * world
    dist.all_gather_object(errors, own and (type(own).__name__, own.message, own.hint))
    failed = [(r, err) for r, err in enumerate(errors) if err is not None]
    if not failed:
        return
    first, (name, message, hint) = failed[0]
    if first == rank:
        error = own  # with its traceback, for --debug
    else:
        import saelab.errors

        cls = getattr(saelab.errors, name, SaelabError)
        cls = cls if isinstance(cls, type) and issubclass(cls, SaelabError) else SaelabError
        named = len(failed) == world or message.startswith(f"rank {first} ")  # every rank's, or says whose
        error = cls(message if named else f"rank {first} of {world}: {message}", hint=hint)
    error.everywhere = True
    raise error


def reports(error: SaelabError) -> bool:
    """Whether this process prints `error`: rank 0 does, and another rank only an error of its own (one every
    rank shares, such as a bad flag or a lost peer, is rank 0's to print)."""
    return is_main() or getattr(error, "rank_local", False)
