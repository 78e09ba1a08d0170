"""Triton fused forward of the compact-WY apply: ``Y = W - V^T (A (V W))``, ``A = T`` or ``T^T``,
one launch, for ``k <= 128``.

Grid ``(cdiv(m, BM), b)``: each program owns a column stripe ``W[:, i_m*BM : (i_m+1)*BM]`` of one
matrix over all ``n`` rows. Pass 1 streams the stripe top-down and accumulates ``X = V W``
(``BK x BM`` fp32, registers); then ``P = A X`` (``BK x BK`` by ``BK x BM``, ieee); pass 2
streams the stripe again, bottom-up, and writes ``Y = W - V^T P``. Bottom-up so the first
tiles pass 2 re-reads are the last ones pass 1 read, still in L2: the re-read hits L2 for the
fraction of the stripe set that L2 holds (all of it when ``n * BM * b_concurrent * bytes`` fits).
In place is safe (``out`` may be ``W``): a program writes only its own stripe, after pass 1 has
read all of it, and each tile of pass 2 is read before it is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mose_kernels.ops.householder.triton_common import block_k, configs, dot_precision, prune_by_registers, round_to

_CONFIGS = configs(
    [{"BM": 32, "BN": 64}, {"BM": 64, "BN": 64}, {"BM": 32, "BN": 128}, {"BM": 64, "BN": 32}, {"BM": 128, "BN": 32}],
    [(4, 3), (8, 3), (4, 4)],
)


@triton.autotune(
    configs=_CONFIGS, prune_configs_by={"early_config_prune": prune_by_registers}, key=["BK", "m"],
    restore_value=["out"],
)
@triton.jit
def wy_apply_fwd_kernel(
    w, out, v, a, x, n, m, k,
    s_wb, s_wn, s_wm, s_ob, s_on, s_om, s_ab, s_ar, s_ac,
    PRECISION: tl.constexpr,
    BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Grid (cdiv(m, BM), b). ``w``/``out``: (b, n, m) strided; ``a`` (b, k, k) fp32 strided (``T``
    or its transposed view); ``v`` (b, k, n) and ``x`` (b, k, m) contiguous fp32."""
    i_m, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    m_m, m_k = o_m < m, o_k < k
    p_w = w + i_b * s_wb
    p_o = out + i_b * s_ob
    p_v = v + i_b * k * n
    NT = tl.cdiv(n, BN)

    b_x = tl.zeros([BK, BM], dtype=tl.float32)
    for i_n in range(NT):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < n
        b_v = tl.load(p_v + o_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_w = tl.load(
            p_w + o_n[:, None] * s_wn + o_m[None, :] * s_wm, mask=m_n[:, None] & m_m[None, :], other=0.0
        ).to(tl.float32)
        b_x = tl.dot(b_v, b_w, b_x, input_precision=PRECISION)
    tl.store(x + i_b * k * m + o_k[:, None] * m + o_m[None, :], b_x, mask=m_k[:, None] & m_m[None, :])

    p_a = a + i_b * s_ab + o_k[:, None] * s_ar + o_k[None, :] * s_ac
    b_a = tl.load(p_a, mask=m_k[:, None] & m_k[None, :], other=0.0)
    b_p = tl.dot(b_a, b_x, input_precision="ieee")

    for j_n in range(NT):
        i_n = NT - 1 - j_n  # bottom-up: re-read the most recently loaded tiles first (L2)
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < n
        m_nm = m_n[:, None] & m_m[None, :]
        b_v = tl.load(p_v + o_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_w = tl.load(p_w + o_n[:, None] * s_wn + o_m[None, :] * s_wm, mask=m_nm, other=0.0).to(tl.float32)
        b_y = b_w - tl.dot(tl.trans(b_v), b_p, input_precision=PRECISION)
        p_y = p_o + o_n[:, None] * s_on + o_m[None, :] * s_om
        tl.store(p_y, round_to(b_y, out.dtype.element_ty), mask=m_nm)


def wy_apply_fused(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    """``out = Q W`` (``Q^T W``) in one launch; returns ``X = V W`` (b, k, m) fp32. Needs k <= 128."""
    b, n, m = W.shape
    k = V.shape[1]
    A = T.transpose(-1, -2) if transpose else T
    X = torch.empty(b, k, m, dtype=torch.float32, device=W.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]), b)

    wy_apply_fwd_kernel[grid](
        W, out, V, A, X, n, m, k,
        *W.stride(), *out.stride(), *A.stride(),
        PRECISION=dot_precision(W.dtype), BK=block_k(k),
    )
    return X
