"""Triton update ``Y = M - V^T P`` for a strided ``M`` ``(b, n, m)``: the second half of the split
apply, and the ``dW`` of the backward when ``k`` is too large for the fused kernel.

Grid ``(cdiv(n, BN), cdiv(m, BM), b)``: a program owns one ``BN x BM`` output tile and sums over
all k blocks. ``out`` may be ``M`` itself (each tile is read before it is written, by the same
program), so the split path is in place with no ``n x m`` temporary too.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from mose_kernels.ops.householder.triton_common import block_k, configs, dot_precision, prune_by_registers, round_to

_CONFIGS = configs([{"BN": 64, "BM": 64}, {"BN": 128, "BM": 64}, {"BN": 64, "BM": 128}], [(4, 3), (8, 3)])


@triton.autotune(
    configs=_CONFIGS, prune_configs_by={"early_config_prune": prune_by_registers}, key=["BK", "m"],
    restore_value=["out"],
)
@triton.jit
def update_kernel(
    a, v, p, out, n, m, k,
    s_ab, s_an, s_am, s_ob, s_on, s_om,
    PRECISION: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
):
    """Grid (cdiv(n, BN), cdiv(m, BM), b). ``v`` (b, k, n), ``p`` (b, k, m) contiguous fp32."""
    i_n, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_m = i_m * BM + tl.arange(0, BM)
    m_n, m_m = o_n < n, o_m < m
    m_nm = m_n[:, None] & m_m[None, :]
    b_y = tl.load(a + i_b * s_ab + o_n[:, None] * s_an + o_m[None, :] * s_am, mask=m_nm, other=0.0)
    b_y = b_y.to(tl.float32)
    for i_k in range(0, k, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < k
        b_v = tl.load(v + i_b * k * n + o_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        b_p = tl.load(p + i_b * k * m + o_k[:, None] * m + o_m[None, :], mask=m_k[:, None] & m_m[None, :],
                      other=0.0)
        b_y -= tl.dot(tl.trans(b_v), b_p, input_precision=PRECISION)
    p_o = out + i_b * s_ob + o_n[:, None] * s_on + o_m[None, :] * s_om
    tl.store(p_o, round_to(b_y, out.dtype.element_ty), mask=m_nm)


def update(A: Tensor, V: Tensor, P: Tensor, out: Tensor, max_bk: int = 128) -> Tensor:
    """``out = A - V^T P`` (rounded once to ``out.dtype``); ``out`` may be ``A``. Returns ``out``."""
    b, n, m = A.shape
    k = V.shape[1]

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]), b)

    update_kernel[grid](
        A, V, P, out, n, m, k, *A.stride(), *out.stride(),
        PRECISION=dot_precision(A.dtype), BK=block_k(k, cap=max_bk),
    )
    return out
