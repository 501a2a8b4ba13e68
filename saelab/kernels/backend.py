"""Which implementation runs a sparse op: the exact PyTorch path or the Triton path.

Both paths expose the same four functions (`gather_sum`, `gather_dot`, `transpose_matmul`, `decoder_backward`),
so the autograd functions pick a module and never branch on the backend themselves.

Rule: Triton when every tensor is on CUDA and `triton` imports, PyTorch otherwise. `SAELAB_KERNELS=torch|triton`
forces one (`auto` or unset = the rule). Forcing Triton with CPU tensors only works under the Triton interpreter
(`TRITON_INTERPRET=1` set before triton is first imported): that is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

ENV_VAR = "SAELAB_KERNELS"
CHOICES = ("auto", "torch", "triton")


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
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def backend_for(*tensors: torch.Tensor | None) -> str:
    """'triton' or 'torch' for an op on these tensors (None entries are ignored)."""
    tensors = [t for t in tensors if t is not None]
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported; install triton or set {ENV_VAR}=torch")
    if not on_cuda:
        from saelab.kernels import triton_kernels  # the module records how its kernels were compiled

        if not triton_kernels.INTERPRETED:
            raise RuntimeError(
                f"{ENV_VAR}=triton with CPU tensors: the Triton kernels run on the CPU only under the Triton "
                f"interpreter (slow, for tests). Set TRITON_INTERPRET=1 before triton is first imported, move the "
                f"tensors to CUDA, or set {ENV_VAR}=torch")
    return "triton"


def ops_for(*tensors: torch.Tensor | None) -> ModuleType:
    """The module (torch_ops or triton_ops) that implements the sparse ops for these tensors."""
    if backend_for(*tensors) == "triton":
        from saelab.kernels import triton_ops

        return triton_ops
    from saelab.kernels import torch_ops

    return torch_ops
