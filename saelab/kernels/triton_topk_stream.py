"""The fused streaming encoder top-k on CUDA: pre = x·W_enc + b_enc a tile at a time, each tile merged into a running
per-token top-k in registers, so the [B, n] pre-activations are never stored (the way FlashAttention never stores the
score matrix). `topk_stream.streaming_topk` sends CUDA tensors here; `fused_topk` is the launcher.

Program (row block r, split s) owns BLOCK_M tokens and a contiguous range of latents (or of `columns`, AuxK's dead
latents): for each BLOCK_N-wide tile it runs the GEMM over d in BLOCK_K steps (`tl.dot`, fp32 accumulation), adds the
bias and rounds to the output dtype as the dense `addmm` does (so bf16 ranks bf16 values), maps the tile to ranking
keys (the pre-activation, its ReLU or its magnitude), then merges:

* Order. Entries rank by (key descending, index ascending): among equal keys the lowest latent index wins. This is
  the torch path's rule on CUDA: its blocks are merged by value, and a row whose ties decide the answer is recomputed
  whole and given to CUDA's `topk`, which keeps the lowest indices among values equal to the k-th. A NaN key ranks
  first (as `topk` ranks NaN); with the identity key its value comes back as +inf.
* Merge. The running top-k (keys, indices, and values when the key is not the value) and the current worst entry
  per row live in registers. A tile is skipped after one compare and one block-wide reduction when no entry beats
  its row's worst (the common case once the first tiles have filled the top-k). Otherwise the tile's entries that
  beat the worst are extracted best first, one per row per iteration, each replacing its row's worst: an iteration
  costs two reductions over the tile and two over the running top-k, O(BLOCK_N + k) per row, and a tile costs
  (1 + the most insertions any row of the block makes), at most k + 1 iterations. For random pre-activations a
  row's expected insertions over t tiles are about k·(1 + ln(t·BLOCK_N / k)), so the merge work is a small multiple
  of k per row while the GEMM is d per entry.
* Splits. Rows alone give too few programs (B 4096 / 128 = 32 on 132 SMs), so the latents are split into ranges of
  at least k each; every program writes its range's top-k sorted best first ([B, splits, k], extracted in k more
  iterations), and a stable sort of the [B, splits·k] candidates by key picks the final k: splits are in index
  order and each is sorted by (key, index), so position order breaks ties by index. Memory: O(B·splits·k).

Exactness: the kernel's GEMM sums in another order than cuBLAS, so values agree with the dense path to GEMM rounding
(fp32 with TF32 off: ~1e-6 relative; bf16: an entry may round to the neighbouring bf16 value), and an index can
differ only where two keys are that close. With TF32 on (`torch.backends.cuda.matmul.allow_tf32`), fp32 inputs use
TF32 tensor cores here too. Integer-valued inputs make every summation order exact; the tests use them to check the
selection, ties included, under the Triton interpreter. The interpreter computes bf16 dots wrongly (it multiplies
the raw bits), so there the operands are widened to fp32 first (exact: bf16 products are exact in fp32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from saelab.kernels.triton_kernels import INTERPRETED
from saelab.kernels.triton_ops import device_guard

KEYS = {"pre": 0, "relu": 1, "abs": 2}  # ranking keys the kernel computes itself (KEY constexpr)
MAX_K = 256  # the running top-k lives in registers (see block_config); a larger k takes the blocked torch path
PROGRAMS_PER_SM = 2  # splits are chosen so that row blocks × splits ≥ this many programs per SM
_BIG = tl.constexpr(2147483647)  # index of a masked or consumed entry (ranks below every real and sentinel entry)


@triton.jit
def _better(key_a, idx_a, key_b, idx_b):
    """(key_a, idx_a) ranks above (key_b, idx_b): a larger key, or an equal key and a lower index."""
    return (key_a > key_b) | ((key_a == key_b) & (idx_a < idx_b))


@triton.jit
def stream_topk_kernel(x_ptr, w_ptr, b_ptr, col_ptr, val_ptr, idx_ptr,
                       B, N, D, K, split_width, stride_x, stride_w,
                       KEY: tl.constexpr, W_COL_MAJOR: tl.constexpr, HAS_COLUMNS: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr):
    """val/idx[rows, split, :K] = the top-K (by key, then lowest index) of pre[rows, latents of this split], sorted.

    Grid (cdiv(B, BLOCK_M), splits). W is [D, N] with stride (1, stride_w) when W_COL_MAJOR, else (stride_w, 1);
    with HAS_COLUMNS latent j of the scan is column col[j] of W (indices stay scan positions)."""
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    start = split * split_width
    end = tl.where(split == n_splits - 1, N, start + split_width)  # the last split takes the remainder

    slots = tl.arange(0, K_PAD)
    real = slots < K
    # empty slots are sentinels (−inf, distinct indices above any latent's), padding slots beyond K never the worst
    run_k = tl.broadcast_to(tl.where(real, float("-inf"), float("inf"))[None, :], (BLOCK_M, K_PAD))
    run_i = tl.broadcast_to(tl.where(real, _BIG - 1 - slots, -1 - slots)[None, :], (BLOCK_M, K_PAD))
    if KEY != 0:
        run_v = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    worst_k = tl.full([BLOCK_M], float("-inf"), tl.float32)
    worst_i = tl.full([BLOCK_M], _BIG - 1, tl.int32)

    for t in range(start, end, BLOCK_N):
        pos = t + tl.arange(0, BLOCK_N)
        pmask = pos < end
        if HAS_COLUMNS:
            col = tl.load(col_ptr + pos, mask=pmask, other=0).to(tl.int64)
        else:
            col = pos.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            dk = d0 + tl.arange(0, BLOCK_K)
            dmask = dk < D
            a = tl.load(x_ptr + rows64[:, None] * stride_x + dk[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0)
            if W_COL_MAJOR:
                w_tile = w_ptr + col[None, :] * stride_w + dk[:, None]
            else:
                w_tile = w_ptr + dk[:, None].to(tl.int64) * stride_w + col[None, :]
            w = tl.load(w_tile, mask=dmask[:, None] & pmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        bias = tl.load(b_ptr + col, mask=pmask, other=0.0).to(tl.float32)
        val = (acc + bias[None, :]).to(b_ptr.dtype.element_ty).to(tl.float32)  # the dense addmm's one rounding
        if KEY == 1:
            key = tl.where(val < 0.0, 0.0, val)  # ReLU that keeps NaN
        elif KEY == 2:
            key = tl.abs(val)
        else:
            key = val
        key = tl.where(key != key, float("inf"), key)
        key = tl.where(pmask[None, :], key, float("-inf"))
        idx = tl.where(pmask, pos, _BIG)

        # extract the entries that beat their row's worst, best first, each replacing the worst
        pending = tl.max(tl.max(_better(key, idx[None, :], worst_k[:, None], worst_i[:, None]).to(tl.int32),
                                axis=1), axis=0) > 0
        last_k = tl.full([BLOCK_M], float("inf"), tl.float32)
        last_i = tl.full([BLOCK_M], -1, tl.int32)
        while pending:
            eligible = (_better(last_k[:, None], last_i[:, None], key, idx[None, :])
                        & _better(key, idx[None, :], worst_k[:, None], worst_i[:, None]))
            best_k = tl.max(tl.where(eligible, key, float("-inf")), axis=1)
            best_i = tl.min(tl.where(eligible & (key == best_k[:, None]), idx[None, :], _BIG), axis=1)
            found = best_i < _BIG
            hit = found[:, None] & (run_i == worst_i[:, None])
            run_k = tl.where(hit, best_k[:, None], run_k)
            run_i = tl.where(hit, best_i[:, None], run_i)
            if KEY != 0:
                best_v = tl.sum(tl.where(idx[None, :] == best_i[:, None], val, 0.0), axis=1)
                run_v = tl.where(hit, best_v[:, None], run_v)
            last_k = tl.where(found, best_k, last_k)
            last_i = tl.where(found, best_i, last_i)
            worst_k = tl.min(run_k, axis=1)
            worst_i = tl.max(tl.where(run_k == worst_k[:, None], run_i, -1), axis=1)
            pending = tl.max(found.to(tl.int32), axis=0) > 0

    # write this split's top-K best first: K extractions over the running top-k (padding slots excluded)
    run_k = tl.where(real[None, :], run_k, float("-inf"))
    run_i = tl.where(real[None, :], run_i, _BIG)
    out = rows64 * n_splits * K + split * K
    for j in range(0, K):
        best_k = tl.max(run_k, axis=1)
        best_i = tl.min(tl.where(run_k == best_k[:, None], run_i, _BIG), axis=1)
        hit = run_i == best_i[:, None]
        if KEY != 0:
            best_v = tl.sum(tl.where(hit, run_v, 0.0), axis=1)
        else:
            best_v = best_k
        tl.store(val_ptr + out + j, best_v.to(val_ptr.dtype.element_ty), mask=rmask)
        tl.store(idx_ptr + out + j, best_i, mask=rmask)
        run_k = tl.where(hit, float("-inf"), run_k)
        run_i = tl.where(hit, _BIG, run_i)


# ------------------------------------------------------------------------------------------------ launcher
def block_config(k: int, dtype: torch.dtype, tf32: bool = False) -> dict:
    """Tile sizes and warps for a top-k of k in `dtype` (fp32 on TF32 tensor cores when `tf32`), chosen so that no
    variant spills on sm_80/sm_90 (`python -m saelab.kernels.compile_check`): BLOCK_M shrinks as k grows, keeping the
    running top-k (BLOCK_M × next_pow2(k) keys and indices) at ≤ 4096 entries; fp32 without tensor cores (an FMA
    GEMM) takes half the rows. Under the interpreter: the smallest tiles tl.dot takes."""
    k_pad = triton.next_power_of_2(k)
    if INTERPRETED:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "K_PAD": k_pad, "num_warps": 1, "num_stages": 1}
    tensor_cores = dtype != torch.float32 or tf32
    block_m = max(16, min(128 if tensor_cores else 64, 4096 // max(k_pad, 32)))
    block_k = 64 if dtype != torch.float32 else 32 if tf32 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if k_pad > 128 else 128, "BLOCK_K": block_k, "K_PAD": k_pad,
            "num_warps": 8 if block_m >= 64 else 4, "num_stages": 3}


def split_width(n: int, k: int, row_blocks: int, block_n: int, programs: int) -> int:
    """Latents per split: splits enough for `programs` programs over `row_blocks` row blocks, each a whole number of
    tiles and at least k wide (so every split fills its top-k); the last split takes the remainder."""
    want = max(1, triton.cdiv(programs, row_blocks))
    width = triton.cdiv(triton.cdiv(n, want), block_n) * block_n
    return max(width, triton.cdiv(k, block_n) * block_n)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests cover the merge of splits
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def rank_keys(values: torch.Tensor, key: str) -> torch.Tensor:
    """The kernel's ranking keys of some pre-activations, in float32 (NaN ranks first, as +inf)."""
    v = values.float()
    if key == "relu":
        v = torch.where(v < 0, 0.0, v)
    elif key == "abs":
        v = v.abs()
    return torch.where(v.isnan(), float("inf"), v)


def fused_topk(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, key: str = "pre",
               columns: torch.Tensor | None = None, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k] in b_enc's dtype, indices [B, k] int64), best first: the top-k by `key` ("pre", "relu", "abs")
    of pre = x_c·W_enc + b_enc over all latents, or over `columns` (indices are then positions in `columns`),
    without storing pre. Ties: the lowest index wins. `splits` fixes the number of latent ranges (tests)."""
    B, D = x_c.shape
    N = W_enc.shape[1] if columns is None else columns.numel()
    if key not in KEYS:
        raise ValueError(f"fused_topk: key must be one of {', '.join(KEYS)}, got {key!r}")
    if not 1 <= k <= min(N, MAX_K):
        raise ValueError(f"fused_topk: k must be in [1, {min(N, MAX_K)}], got {k}")
    if N >= 2 ** 31 - 1 - 2 * MAX_K:
        raise ValueError(f"fused_topk: {N} latents; the kernel indexes fewer than 2^31 - {2 * MAX_K + 1}")
    if not x_c.dtype == W_enc.dtype == b_enc.dtype:
        raise ValueError(f"fused_topk: x_c, W_enc and b_enc must share a dtype, got {x_c.dtype}, {W_enc.dtype}, "
                         f"{b_enc.dtype}")
    values = torch.empty(B, k, dtype=b_enc.dtype, device=x_c.device)
    indices = torch.empty(B, k, dtype=torch.long, device=x_c.device)
    if B == 0:
        return values, indices
    tf32 = x_c.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED
    cfg = block_config(k, x_c.dtype, tf32)
    row_blocks = triton.cdiv(B, cfg["BLOCK_M"])
    width = split_width(N, k, row_blocks, cfg["BLOCK_N"], _programs(x_c.device) if splits is None else
                        row_blocks * splits)
    n_splits = max(1, triton.cdiv(N, width))
    if n_splits > 1 and N - (n_splits - 1) * width < k:  # a last range narrower than k joins the one before
        n_splits -= 1
    x = x_c.contiguous()
    col_major = W_enc.stride(0) == 1 or W_enc.shape[0] <= 1
    W = W_enc if (col_major or W_enc.stride(1) == 1) else W_enc.contiguous()
    cols = columns.contiguous() if columns is not None else indices  # an unused pointer without columns
    part_val = torch.empty(B, n_splits, k, dtype=b_enc.dtype, device=x_c.device)
    part_idx = torch.empty(B, n_splits, k, dtype=torch.int32, device=x_c.device)
    with device_guard(x_c.device):
        stream_topk_kernel[(row_blocks, n_splits)](
            x, W, b_enc.contiguous(), cols, part_val, part_idx, B, N, D, k, width, x.stride(0),
            W.stride(1) if col_major else W.stride(0),
            KEY=KEYS[key], W_COL_MAJOR=col_major, HAS_COLUMNS=columns is not None,
            PRECISION="tf32" if tf32 else "ieee", UPCAST=INTERPRETED and x_c.dtype == torch.bfloat16, **cfg)
    if n_splits == 1:
        return part_val.view(B, k), part_idx.view(B, k).long()
    cand_val, cand_idx = part_val.view(B, n_splits * k), part_idx.view(B, n_splits * k)
    pos = rank_keys(cand_val, key).sort(dim=1, descending=True, stable=True).indices[:, :k]
    return cand_val.gather(1, pos), cand_idx.gather(1, pos).long()


_CHECKED: set[tuple[str, torch.dtype]] = set()


def checked(device: torch.device, dtype: torch.dtype) -> bool:
    """True once the kernel has given the exact answer on a small case on (device, dtype) in this process (run the
    first time it is asked); raises RuntimeError when it does not. The case has integer inputs, so every summation
    order gives the same pre-activations: ragged shapes (37 tokens, 300 latents, d 40), three splits, and ties."""
    if (str(device), dtype) in _CHECKED:
        return True
    g = torch.Generator().manual_seed(20240611)
    x, W, b = (torch.randint(-3, 4, shape, generator=g).to(device, dtype) for shape in ((37, 40), (300, 40), (300,)))
    got_v, got_i = fused_topk(x, W.T, b, 5, splits=3)
    pre = torch.addmm(b.double(), x.double(), W.double().T).to(dtype)  # exact, then the dense path's rounding
    want_i = rank_keys(pre, "pre").sort(dim=1, descending=True, stable=True).indices[:, :5]
    if not (torch.equal(got_i, want_i) and torch.equal(got_v, pre.gather(1, want_i))):
        raise RuntimeError(f"the fused streaming top-k gives a wrong answer on its check case on {device} {dtype}")
    _CHECKED.add((str(device), dtype))
    return True
