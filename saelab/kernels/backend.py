"""Which implementation runs a sparse op: the exact PyTorch path or the Triton path, checked before it is trusted.

Both paths expose the same four functions (`gather_sum`, `gather_dot`, `transpose_matmul`, `decoder_backward`),
so the autograd functions pick one with `ops_for` and never branch on the backend themselves.

Rule (`SAELAB_KERNELS` unset or `auto`): Triton when every tensor is on one CUDA device, every floating tensor is
float32, float16 or bfloat16, `triton` imports, and the Triton path passed its self-test for that device and dtype;
PyTorch otherwise. float64 (and any dtype the kernels do not serve) always takes the exact PyTorch path, also when
Triton is forced, since the kernels would compute it in float32.

Self-test (`selftest.run`): the first time the Triton path would serve a (device, dtype) in a process, each Triton
op runs once on a small random case against a dense float64 reference. If one raises (a failed compile or launch)
or is wrong, `auto` warns once (`KernelFallbackWarning`) and uses the PyTorch ops for that (device, dtype) for the
rest of the process. A Triton op that raises later, in a variant the self-test did not build, is treated the same
way and its call is redone on the PyTorch path, so training goes on. `SAELAB_KERNELS=triton` turns both into an
error instead (the user asked for Triton); `SAELAB_KERNELS=torch` skips the Triton path, the test and the warning.
Forcing Triton with CPU tensors only works under the Triton interpreter (`TRITON_INTERPRET=1` set before triton is
first imported): that is how the tests check the kernels without a GPU.

The fused streaming encoder top-k (`triton_topk_stream`, which `topk_stream.streaming_topk` calls) takes the Triton
path by the same rule, and falls back the same way (`with_fallback`) when it raises or fails its own first check.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from saelab.errors import ConfigError
from saelab.kernels.selftest import SelfTest, describe

ENV_VAR = "SAELAB_KERNELS"
CHOICES = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AUTO_DEVICE_TYPES = ("cuda",)  # device types `auto` sends to Triton (tests add "cpu" under the interpreter)
_FIX = f"unset {ENV_VAR} (the default falls back to the PyTorch path by itself) or set {ENV_VAR}=torch"

# this process's verdict per (device, dtype) on the Triton path: its self-test, or a later failure of a launch
_VERDICTS: dict[tuple[str, torch.dtype], SelfTest] = {}
_WARNED: set[tuple[str, torch.dtype]] = set()


class KernelFallbackWarning(RuntimeWarning):
    """The Triton path failed on a device and dtype; the exact PyTorch path serves it from now on."""


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libraries)
        return False
    return True


def forced_backend() -> str:
    """The value of SAELAB_KERNELS, validated ('auto' when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"{ENV_VAR}={value!r}: expected one of {', '.join(CHOICES)}",
                          hint=f"unset {ENV_VAR} to let saelab choose")
    return value


def _device(tensors: list[torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise ValueError(f"sparse kernels: the tensors are on different devices ({names}); move them to one device")
    return devices.pop()


def self_test(device: torch.device | str, dtype: torch.dtype) -> SelfTest:
    """The Triton path's verdict for (device, dtype): its self-test, run the first time it is asked in this process
    (or the failure that replaced it). Needs `triton_available()`."""
    key = (str(torch.device(device)), dtype)
    if key not in _VERDICTS:
        from saelab.kernels import selftest, triton_ops

        _VERDICTS[key] = selftest.run(triton_ops, "triton", key[0], dtype)
    return _VERDICTS[key]


def _trusted(device: torch.device, dtypes: set[torch.dtype], forced: bool) -> bool:
    """Has the Triton path passed for this device and every dtype? A failure raises when Triton was forced, else
    warns (once per device and dtype) and answers False."""
    for dtype in sorted(dtypes, key=str):
        verdict = self_test(device, dtype)
        if verdict.ok:
            continue
        where = f"{verdict.device} {verdict.dtype}"
        if forced:
            raise ConfigError(f"{ENV_VAR}=triton, but the Triton kernels fail on {where}: {verdict.failure}",
                              hint=f"{_FIX}; `saelab doctor` shows the kernels' state on every device")
        if (verdict.device, dtype) not in _WARNED:
            _WARNED.add((verdict.device, dtype))
            warnings.warn(f"saelab: the Triton kernels fail on {where} ({verdict.failure}); the exact PyTorch path "
                          f"(slower) serves {where} for the rest of this process. Set {ENV_VAR}=torch to skip the "
                          f"Triton path and this warning; `saelab doctor` reports the details",
                          KernelFallbackWarning, stacklevel=3)
        return False
    return True


def backend_for(*tensors: torch.Tensor | None) -> str:
    """'triton' or 'torch' for an op on these tensors (None entries are ignored). May run the self-test."""
    forced = forced_backend()
    tensors = [t for t in tensors if t is not None]
    if forced == "torch" or not tensors:
        return "torch"
    device = _device(tensors)
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(TRITON_DTYPES):
        return "torch"  # float64 needs the exact path (the kernels accumulate in float32)
    if forced == "auto":
        if device.type not in AUTO_DEVICE_TYPES or not triton_available():
            return "torch"
        return "triton" if _trusted(device, dtypes, forced=False) else "torch"
    if not triton_available():
        raise ConfigError(f"{ENV_VAR}=triton but triton cannot be imported", hint=f"install triton or {_FIX}")
    if device.type != "cuda":
        from saelab.kernels import triton_kernels  # the module records how its kernels were compiled

        if not triton_kernels.INTERPRETED:
            raise ConfigError(
                f"{ENV_VAR}=triton with {device.type} tensors: the Triton kernels run on the CPU only under the "
                f"Triton interpreter (slow, for tests)",
                hint=f"set TRITON_INTERPRET=1 before triton is first imported, move the tensors to CUDA, or {_FIX}")
    _trusted(device, dtypes, forced=True)
    return "triton"


class _TritonWithFallback:
    """`triton_ops` for `auto`, with a safety net: an op that raises (a kernel variant the self-test did not build
    fails to compile or launch) becomes this device and dtype's verdict, warns once, and the call is redone by
    `torch_ops`; once a verdict is a failure every call goes to `torch_ops`. Out-of-memory errors pass through."""

    def __init__(self, device: torch.device, dtypes: frozenset[torch.dtype]):
        self.device, self.dtypes = device, dtypes

    def gather_sum(self, *args):
        return self._run("gather_sum", args)

    def gather_dot(self, *args):
        return self._run("gather_dot", args)

    def transpose_matmul(self, *args):
        return self._run("transpose_matmul", args)

    def decoder_backward(self, *args):
        return self._run("decoder_backward", args)

    def _run(self, op: str, args: tuple):
        from saelab.kernels import torch_ops, triton_ops

        return with_fallback(self.device, self.dtypes, op, lambda: getattr(triton_ops, op)(*args),
                             lambda: getattr(torch_ops, op)(*args))


def with_fallback(device: torch.device, dtypes: frozenset[torch.dtype], op: str, triton_call, torch_call):
    """`triton_call()` while the Triton path is trusted on this device and these dtypes, else `torch_call()`; a
    Triton call that raises (other than out of memory) becomes their verdict, warns once, and `torch_call` answers."""
    if _trusted(device, set(dtypes), forced=False):
        try:
            return triton_call()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any kernel failure: record it, warn, and use the exact path
            for dtype in dtypes:
                key = (str(device), dtype)
                _VERDICTS[key] = SelfTest("triton", key[0], str(dtype).removeprefix("torch."), False,
                                          f"{op} raised {describe(e)}")
            _trusted(device, set(dtypes), forced=False)  # the warning
    return torch_call()


@functools.lru_cache(maxsize=None)
def _with_fallback(device: torch.device, dtypes: frozenset[torch.dtype]) -> _TritonWithFallback:
    return _TritonWithFallback(device, dtypes)


def ops_for(*tensors: torch.Tensor | None) -> ModuleType | _TritonWithFallback:
    """The implementation of the sparse ops for these tensors: `torch_ops`, `triton_ops` (forced), or, in `auto`,
    `triton_ops` behind the fallback above."""
    if backend_for(*tensors) == "triton":
        from saelab.kernels import triton_ops

        if forced_backend() == "triton":
            return triton_ops
        present = [t for t in tensors if t is not None]
        return _with_fallback(present[0].device, frozenset(t.dtype for t in present if t.is_floating_point()))
    from saelab.kernels import torch_ops

    return torch_ops
