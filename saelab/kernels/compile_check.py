"""Compile every Triton kernel for NVIDIA GPUs without a GPU: `python -m saelab.kernels.compile_check`.

The interpreter (how the tests run the kernels on a CPU) checks the arithmetic but not code generation; this
lowers each kernel, in the variants `triton_ops` launches, to a cubin with the ptxas that ships with triton, and
reports registers and local memory (spills) per variant. Must run in a process without TRITON_INTERPRET=1.

The fused streaming top-k (`triton_topk_stream`) is compiled with the divisibility-by-16 hints its launches get at
run time (aligned pointers, d and strides multiples of 16): without them Triton cannot vectorise its GEMM tile loads
and the register counts reported would not be the real kernel's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch


def _variants():
    """(kernel name, signature, constexprs, options, arguments hinted divisible by 16): the sparse ops' kernels in fp32
    and bf16, narrow and wide tiles, fused or not; the streaming top-k at k 32 (fp32 on FMA and on TF32 tensor
    cores, bf16), k 128 by |pre| over AuxK's columns, and k 256 by ReLU, with the tiles `block_config` launches."""
    from saelab.kernels.triton_ops import _warps
    from saelab.kernels.triton_topk_stream import block_config

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
            opts = {"num_warps": _warps(rows * block)}
            out.append(("gather_sum_kernel", gather, {"BLOCK_K": rows, "BLOCK_D": block}, opts, ()))
            out.append(("gather_dot_kernel", dot, {"BLOCK_K": rows, "BLOCK_D": block}, opts, ()))
            for fuse in (True, False):
                out.append(("owner_kernel", owner, {"LATENTS": 4, "BLOCK_P": rows, "BLOCK_D": block,
                                                    "FUSE_DOT": fuse}, opts, ()))
    out.append(("count_kernel", {"idx_ptr": "*i64", "count_ptr": "*i32", "total": "i32"}, {"BLOCK": 1024},
                {"num_warps": 4}, ()))
    out.append(("fill_kernel", {"idx_ptr": "*i64", "start_ptr": "*i32", "cursor_ptr": "*i32", "rev_ptr": "*i32",
                                "total": "i32"}, {"BLOCK": 1024}, {"num_warps": 4}, ()))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dt, tf32, k, key, columns in (("fp32", False, 32, 0, False), ("fp32", True, 32, 0, False),
                                      ("bf16", False, 32, 0, False), ("bf16", False, 128, 2, True),
                                      ("bf16", False, 256, 1, False)):
        stream = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "col_ptr": "*i64", "val_ptr": f"*{dt}",
                  "idx_ptr": "*i32", "B": "i32", "N": "i32", "D": "i32", "K": "i32", "split_width": "i32",
                  "stride_x": "i32", "stride_w": "i32"}
        cfg = block_config(k, dtypes[dt], tf32)
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        consts = {"KEY": key, "W_COL_MAJOR": True, "HAS_COLUMNS": columns, "PRECISION": "tf32" if tf32 else "ieee",
                  "UPCAST": False, **cfg}
        out.append(("stream_topk_kernel", stream, consts, opts,
                    ("x_ptr", "w_ptr", "b_ptr", "col_ptr", "val_ptr", "idx_ptr", "D", "split_width", "stride_x",
                     "stride_w")))
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


def _source(triton, fn, sig: dict, consts: dict, divisible: tuple = ()):
    """The kernel with its argument types (and `divisible` arguments hinted multiples of 16), in the ASTSource form
    of the installed triton."""
    try:  # newer triton: constexprs are part of the signature, hints are attributes by argument position
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
        return triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                         constexprs=consts, attrs=attrs)
    except TypeError:  # triton 3.0-3.2: the signature names the runtime arguments, `constants` the constexprs (its
        # hints take another form, so there the registers reported are those of an unhinted kernel)
        return triton.compiler.ASTSource(fn=fn, signature=sig, constants=consts)


def compile_all(archs=(80, 90)) -> list[str]:
    """Compile every variant for each sm_<arch>; returns one line per variant; raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check needs a process without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    from saelab.kernels import triton_kernels, triton_topk_stream

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    lines = []
    for arch in archs:
        for name, sig, consts, opts, divisible in _variants():
            fn = getattr(triton_kernels, name, None) or getattr(triton_topk_stream, name)
            kernel = triton.compile(_source(triton, fn, sig, consts, divisible), target=GPUTarget("cuda", arch, 32),
                                    options=opts)
            res = _resources(kernel.asm["cubin"], cuobjdump)
            launch = " ".join(f"{key.removeprefix('num_')}={value}" for key, value in opts.items())
            lines.append(f"sm_{arch} {name} {sig.get('w_ptr', sig.get('dense_ptr', ''))} {consts} {launch} "
                         f"{res}".rstrip())
    return lines


if __name__ == "__main__":
    archs = tuple(int(a) for a in sys.argv[1:]) or (80, 90)
    for line in compile_all(archs):
        print(line)
