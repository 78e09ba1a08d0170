"""Triton projection ``X = V M`` for a strided ``M`` ``(b, n, m)`` of any float dtype: the first
half of the split apply (large k, or too few column stripes to fill the GPU) and ``Z = V dY``
of the backward.

Grid ``(cdiv(m, BM) * NKB, NS, b)``: a program computes one ``BK x BM`` tile of ``X`` over an
n-chunk of ``rows`` rows. With ``NS > 1`` (the split-n variant, for small ``m``) the partial sums
meet through fp32 atomics in a zeroed ``X``: the summation order is not deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mose_kernels.ops.householder.triton_common import block_k, configs, dot_precision, prune_by_registers, sm_count

_CONFIGS = configs([{"BM": 64, "BN": 64}, {"BM": 32, "BN": 128}, {"BM": 128, "BN": 32}], [(4, 3), (8, 3)])
# Smallest n-chunk of the split-n variant (rows per program).
_MIN_ROWS = 512


@triton.autotune(
    configs=_CONFIGS, prune_configs_by={"early_config_prune": prune_by_registers}, key=["BK", "m"], reset_to_zero=["x"]
)
@triton.jit
def project_kernel(
    v, a, x, n, m, k, rows, NKB,
    s_ab, s_an, s_am,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Grid (cdiv(m, BM) * NKB, NS, b). ``v`` (b, k, n) and ``x`` (b, k, m) fp32; ``a`` (b, n, m) strided."""
    i_mk, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    i_m, i_k = i_mk // NKB, i_mk % NKB
    o_m = i_m * BM + tl.arange(0, BM)
    o_k = i_k * BK + tl.arange(0, BK)
    m_m, m_k = o_m < m, o_k < k
    p_v = v + i_b * k * n
    p_a = a + i_b * s_ab
    n_start = i_s * rows
    n_stop = tl.minimum(n_start + rows, n)
    b_x = tl.zeros([BK, BM], dtype=tl.float32)
    for i_n in range(n_start, n_stop, BN):
        o_n = i_n + tl.arange(0, BN)
        m_n = o_n < n_stop
        b_v = tl.load(p_v + o_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_a = tl.load(
            p_a + o_n[:, None] * s_an + o_m[None, :] * s_am, mask=m_n[:, None] & m_m[None, :], other=0.0
        ).to(tl.float32)
        b_x = tl.dot(b_v, b_a, b_x, input_precision=PRECISION)
    p_x = x + i_b * k * m + o_k[:, None] * m + o_m[None, :]
    m_x = m_k[:, None] & m_m[None, :]
    if ATOMIC:
        tl.atomic_add(p_x, b_x, mask=m_x)
    else:
        tl.store(p_x, b_x, mask=m_x)


def project(V: Tensor, A: Tensor, max_bk: int = 128) -> Tensor:
    """``V A`` as (b, k, m) fp32 for ``V`` (b, k, n) contiguous fp32 and ``A`` (b, n, m) strided."""
    b, k, n = V.shape
    m = A.shape[2]
    BK = block_k(k, cap=max_bk)
    NKB = triton.cdiv(k, BK)
    # Split n only when the (m, k) tiles leave the GPU idle; 32 columns is the narrowest tile.
    tiles = triton.cdiv(m, 32) * NKB * b
    NS = max(1, min(2 * sm_count(A.device) // max(tiles, 1), triton.cdiv(n, _MIN_ROWS)))
    rows = triton.cdiv(n, NS)
    X = (torch.zeros if NS > 1 else torch.empty)(b, k, m, dtype=torch.float32, device=V.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * NKB, NS, b)

    project_kernel[grid](
        V, A, X, n, m, k, rows, NKB, *A.stride(),
        ATOMIC=NS > 1, PRECISION=dot_precision(A.dtype), BK=BK,
    )
    return X
