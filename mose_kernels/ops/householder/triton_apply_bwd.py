"""Triton backward of the compact-WY apply: one pass over ``dY`` and ``W`` together that writes
``dV = C V - P dY^T - R W^T`` and, for ``k <= 128``, ``dW = dY - V^T R`` as well, with
``C = dG + dG^T`` (``k x k``), ``P = A X`` and ``R = A^T Z`` (``k x m``, fp32, formed by the caller
from ``Z = V dY``, one projection pass over ``dY`` before this one).

Grid ``(cdiv(n, BN), cdiv(k, BK), b)``: a program owns the ``BN``-row strip ``nb`` of ``dY``, ``W``
(and ``dW``) and the ``BK x BN`` tile ``dV[kb, nb]``; it starts from ``C[kb, :] V[:, nb]`` and
streams the strip along ``m``. ``dY`` and ``W`` are read once when ``k <= BK``, so the backward of
both gradients moves 4 ``n x m`` arrays (``dY`` twice, ``W``, ``dW``) against the 3 of a floor that
ignores the ``Z`` dependency. ``dW`` alone is the forward apply on ``dY`` with the transpose
flipped (``dW = Q^T dY``), which also returns ``Z``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mose_kernels.ops.householder.triton_common import block_k, configs, dot_precision, prune_by_registers, round_to

_CONFIGS = configs([{"BN": 64, "BM": 64}, {"BN": 32, "BM": 128}, {"BN": 128, "BM": 32}], [(4, 3), (8, 3)])


@triton.autotune(
    configs=_CONFIGS, prune_configs_by={"early_config_prune": prune_by_registers}, key=["BK", "m", "WRITE_DW"]
)
@triton.jit
def wy_apply_bwd_kernel(
    dy, w, v, c, p, r, dv, dw, n, m, k,
    s_db, s_dn, s_dm, s_wb, s_wn, s_wm, s_gb, s_gn, s_gm,
    WRITE_DW: tl.constexpr, PRECISION: tl.constexpr,
    BK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
):
    """Grid (cdiv(n, BN), cdiv(k, BK), b); ``WRITE_DW`` needs a single k block. ``dy``, ``w``, ``dw``
    (b, n, m) strided; ``v`` (b, k, n), ``c`` (b, k, k), ``p``/``r`` (b, k, m), ``dv`` (b, k, n)
    contiguous fp32."""
    i_n, i_k, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_k = i_k * BK + tl.arange(0, BK)
    m_n, m_k = o_n < n, o_k < k
    p_v = v + i_b * k * n

    b_dv = tl.zeros([BK, BN], dtype=tl.float32)
    for j_k in range(0, k, BK):
        o_j = j_k + tl.arange(0, BK)
        m_j = o_j < k
        b_c = tl.load(c + i_b * k * k + o_k[:, None] * k + o_j[None, :], mask=m_k[:, None] & m_j[None, :],
                      other=0.0)
        b_v = tl.load(p_v + o_j[:, None] * n + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0)
        b_dv = tl.dot(b_c, b_v, b_dv, input_precision="ieee")
    if WRITE_DW:
        b_vt = tl.trans(tl.load(p_v + o_k[:, None] * n + o_n[None, :], mask=m_k[:, None] & m_n[None, :],
                                other=0.0))

    for i_m in range(0, m, BM):
        o_m = i_m + tl.arange(0, BM)
        m_m = o_m < m
        m_km = m_k[:, None] & m_m[None, :]
        m_nm = m_n[:, None] & m_m[None, :]
        b_p = tl.load(p + i_b * k * m + o_k[:, None] * m + o_m[None, :], mask=m_km, other=0.0)
        b_r = tl.load(r + i_b * k * m + o_k[:, None] * m + o_m[None, :], mask=m_km, other=0.0)
        b_dy = tl.load(dy + i_b * s_db + o_n[:, None] * s_dn + o_m[None, :] * s_dm, mask=m_nm, other=0.0)
        b_dy = b_dy.to(tl.float32)
        b_w = tl.load(w + i_b * s_wb + o_n[:, None] * s_wn + o_m[None, :] * s_wm, mask=m_nm, other=0.0)
        b_dv -= tl.dot(b_p, tl.trans(b_dy), input_precision=PRECISION)
        b_dv -= tl.dot(b_r, tl.trans(b_w.to(tl.float32)), input_precision=PRECISION)
        if WRITE_DW:
            b_dw = b_dy - tl.dot(b_vt, b_r, input_precision=PRECISION)
            p_dw = dw + i_b * s_gb + o_n[:, None] * s_gn + o_m[None, :] * s_gm
            tl.store(p_dw, round_to(b_dw, dw.dtype.element_ty), mask=m_nm)
    tl.store(dv + i_b * k * n + o_k[:, None] * n + o_n[None, :], b_dv, mask=m_k[:, None] & m_n[None, :])


def wy_apply_bwd(
    dY: Tensor, W: Tensor, V: Tensor, C: Tensor, P: Tensor, R: Tensor, dW: Tensor | None = None
) -> Tensor:
    """``dV = C V - P dY^T - R W^T`` as (b, k, n) fp32; also writes ``dW = dY - V^T R`` into ``dW``
    when given (needs ``k <= 128``). See the module docstring."""
    b, n, m = W.shape
    k = V.shape[1]
    dV = torch.empty(b, k, n, dtype=torch.float32, device=W.device)
    BK = block_k(k)
    if dW is not None and k > BK:
        raise ValueError(f"the fused dW needs k <= {BK}, got k = {k}")

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]), triton.cdiv(k, BK), b)

    out = dV if dW is None else dW  # dw is unused when WRITE_DW is off
    wy_apply_bwd_kernel[grid](
        dY, W, V, C, P, R, dV, out, n, m, k, *dY.stride(), *W.stride(), *out.stride()[-3:],
        WRITE_DW=dW is not None, PRECISION=dot_precision(W.dtype), BK=BK,
    )
    return dV
