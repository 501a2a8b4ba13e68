"""The kernels' self-test: each sparse op of one path once on a small random case against a dense float64 reference.

`backend` runs it for the Triton path the first time that path would serve a (device, dtype) in a process, so a
kernel that fails to compile or launch (no C compiler for Triton's launcher, a driver too old for the PTX) or gives
a wrong result is caught before training uses it. `saelab doctor` runs it for both paths on every device.

Cost: about ten small tensors and the four ops once, plus, the first time on a machine, compiling the kernels'
small-tile variants (a few seconds; Triton caches them on disk). It draws its numbers from its own generator, so
the caller's random streams are untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Callable

import torch

B, K, N, D = 6, 5, 19, 40  # tokens, slots, latents, width: not powers of two
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-9}


@dataclass
class SelfTest:
    backend: str  # 'triton' or 'torch'
    device: str  # 'cuda:0', 'cpu'
    dtype: str  # 'float32', 'bfloat16', ...
    ok: bool
    failure: str = ""  # what failed: '<op> raised <Error>: <message>' or '<op>: max error ... > tolerance'
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _case(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A code with the awkward cases (a latent twice in one token, a latent in every token, padding slots with
    value 0, a token with no live slot), a decoder and a gradient, in `dtype` on `device`."""
    g = torch.Generator().manual_seed(20240611)
    idx = torch.randint(0, N, (B, K), generator=g)
    idx[0, 1] = idx[0, 0]
    idx[:, 0] = idx[0, 0]
    val = torch.randn(B, K, generator=g)
    val[:, -1] = 0.0
    val[B // 2] = 0.0
    W = torch.randn(N, D, generator=g)
    dense = torch.randn(B, D, generator=g)
    return {"idx": idx.to(device), "val": val.to(device, dtype), "W": W.to(device, dtype),
            "dense": dense.to(device, dtype)}


def _references(case: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each op's exact result, from dense float64 arithmetic on the CPU copies of the (rounded) inputs."""
    idx, val, W, dense = (case[k].cpu() for k in ("idx", "val", "W", "dense"))
    val, W, dense = val.double(), W.double(), dense.double()
    S = torch.zeros(B, N, dtype=torch.float64).scatter_add_(1, idx, val)  # the code as a dense [B, N] matrix
    dots = (dense @ W.T).gather(1, idx)
    return {"gather_sum": (S @ W,), "gather_dot": (dots,), "transpose_matmul": (S.T @ dense,),
            "decoder_backward": (dots, S.T @ dense)}


def _calls(ops: ModuleType, case: dict[str, torch.Tensor]) -> dict[str, Callable[[], tuple]]:
    idx, val, W, dense = case["idx"], case["val"], case["W"], case["dense"]
    return {"gather_sum": lambda: (ops.gather_sum(idx, val, W),),
            "gather_dot": lambda: (ops.gather_dot(idx, dense, W),),
            "transpose_matmul": lambda: (ops.transpose_matmul(idx, val, dense, N),),
            "decoder_backward": lambda: ops.decoder_backward(idx, val, dense, W, True, True)}


def _mismatch(got: tuple, want: tuple, dtype: torch.dtype) -> str:
    """'' when every output has the reference's shape and is within the dtype's tolerance (max error relative to the
    reference's largest entry), else what is wrong."""
    tol = TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or tuple(a.shape) != tuple(b.shape):
            return f"output {i} has shape {None if a is None else tuple(a.shape)}, expected {tuple(b.shape)}"
        err = (a.detach().double().cpu() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
        if not err <= tol:  # also catches NaN
            return f"output {i} is wrong: max error {err:.3g} > {tol:g} (relative to the exact result)"
    return ""


def run(ops: ModuleType, backend: str, device: torch.device | str, dtype: torch.dtype) -> SelfTest:
    """Run each op of `ops` (torch_ops or triton_ops) once on `device` in `dtype`; the first failure stops it."""
    device = torch.device(device)
    start = time.perf_counter()

    def result(failure: str = "") -> SelfTest:
        return SelfTest(backend, str(device), str(dtype).removeprefix("torch."), not failure, failure,
                        round(time.perf_counter() - start, 3))

    with torch.inference_mode(False), torch.no_grad():
        try:
            case = _case(device, dtype)
            want = _references(case)
        except Exception as e:  # noqa: BLE001 -- the device itself cannot hold the case: say so
            return result(f"preparing the case raised {describe(e)}")
        for op, call in _calls(ops, case).items():
            try:
                got = call()
                wrong = _mismatch(got, want[op], dtype)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 -- any failure of a kernel is what this test is for
                return result(f"{op} raised {describe(e)}")
            if wrong:
                return result(f"{op}: {wrong}")
    return result()


def describe(e: BaseException) -> str:
    """'RuntimeError: <first line of the message>', at most 300 characters."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
