"""Compile every Triton kernel for NVIDIA GPUs without a GPU: `python -m saelab.kernels.compile_check`.

The interpreter (how the tests run the kernels on a CPU) checks the arithmetic but not code generation; this
lowers each kernel, in the variants `triton_ops` launches, to a cubin with the ptxas that ships with triton, and
reports registers and local memory (spills) per variant. Must run in a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def _variants():
    """(kernel name, signature, constexprs, num_warps): fp32 and bf16, narrow and wide tiles, fused or not."""
    from saelab.kernels.triton_ops import _warps

    out = []
    for dt in ("fp32", "bf16"):
        gather = {"idx_ptr": "*i64", "w_ptr": f"*{dt}", "table_ptr": f"*{dt}", "out_ptr": f"*{dt}", "K": "i32",
                  "D": "i32", "stride_t": "i32"}
        dot = {"idx_ptr": "*i64", "dense_ptr": f"*{dt}", "table_ptr": f"*{dt}", "out_ptr": "*fp32", "K": "i32",
               "D": "i32", "stride_t": "i32"}
        owner = {"order_ptr": "*i64", "start_ptr": "*i32", "rev_ptr": "*i32", "w_ptr": f"*{dt}",
                 "dense_ptr": f"*{dt}", "out_ptr": f"*{dt}", "table_ptr": f"*{dt}", "dot_ptr": f"*{dt}", "n": "i32",
                 "K": "i32", "D": "i32", "stride_t": "i32", "n_progs": "i32"}
        for rows, block in ((16, 256), (4, 1024), (1, 4096)):
            warps = _warps(rows * block)
            out.append(("gather_sum_kernel", gather, {"BLOCK_K": rows, "BLOCK_D": block}, warps))
            out.append(("gather_dot_kernel", dot, {"BLOCK_K": rows, "BLOCK_D": block}, warps))
            for fuse in (True, False):
                out.append(("owner_kernel", owner, {"LATENTS": 4, "BLOCK_P": rows, "BLOCK_D": block,
                                                    "FUSE_DOT": fuse}, warps))
    out.append(("count_kernel", {"idx_ptr": "*i64", "count_ptr": "*i32", "total": "i32"}, {"BLOCK": 1024}, 4))
    out.append(("fill_kernel", {"idx_ptr": "*i64", "start_ptr": "*i32", "cursor_ptr": "*i32", "rev_ptr": "*i32",
                                "total": "i32"}, {"BLOCK": 1024}, 4))
    return out


def _resources(cubin: bytes, cuobjdump: str) -> str:
    if not os.path.exists(cuobjdump):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
    line = next((ln.strip() for ln in res.stdout.splitlines() if "REG:" in ln), "")
    return " ".join(p for p in line.split() if p.split(":")[0] in ("REG", "LOCAL", "STACK"))


def _source(triton, fn, sig: dict, consts: dict):
    """The kernel with its argument types, in the ASTSource form of the installed triton."""
    try:  # newer triton: constexprs are part of the signature
        return triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                         constexprs=consts)
    except TypeError:  # triton 3.0-3.2: the signature names the runtime arguments, `constants` the constexprs
        return triton.compiler.ASTSource(fn=fn, signature=sig, constants=consts)


def compile_all(archs=(80, 90)) -> list[str]:
    """Compile every variant for each sm_<arch>; returns one line per variant; raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs a process without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    from saelab.kernels import triton_kernels

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    lines = []
    for arch in archs:
        for name, sig, consts, warps in _variants():
            src = _source(triton, getattr(triton_kernels, name), sig, consts)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            res = _resources(kernel.asm["cubin"], cuobjdump)
            lines.append(f"sm_{arch} {name} {sig.get('w_ptr', sig.get('dense_ptr', ''))} {consts} "
                         f"warps={warps} {res}".rstrip())
    return lines


if __name__ == "__main__":
    archs = tuple(int(a) for a in sys.argv[1:]) or (80, 90)
    for line in compile_all(archs):
        print(line)
