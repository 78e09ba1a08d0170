"""Triton compact-WY factor: ``G = V V^T`` (split over n) and ``T = S^{-1}``,
``S = diag(G) / 2 + striu(G)``, by the LARFT column recurrence in registers for ``k <= 64``.

Two kernels rather than one: a single program per matrix would read all of ``V`` (3.7 MB at
n = 14336, k = 64) from one SM, tens of microseconds; the Gram kernel instead spreads the n-reduction
over ``NS`` programs writing deterministic partial sums, and the solve kernel adds them up.
For ``k > 64`` the ``k x k`` triangle is inverted by ``torch.linalg.solve_triangular`` on the
Gram matrix the kernel computed (a ``k x k`` problem: no traffic worth a kernel, stated plainly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mose_kernels.ops.householder.triton_common import block_k

# Largest k whose triangle the solve kernel inverts in registers (two BK x BK fp32 tiles).
MAX_SOLVE_K = 64
# Rows of V one Gram program reduces (the n-split): enough work per program, and NS <= 64.
_GRAM_ROWS = 2048
_GRAM_BN = 32


@triton.jit
def gram_kernel(v, g, n, k, rows, NKB, BK: tl.constexpr, BN: tl.constexpr):
    """Partial ``G[ib, jb] = V[ib, rows] V[jb, rows]^T`` of one n-chunk; grid (NKB * NKB, NS, b).

    ``g`` is ``(b, NS, k, k)`` fp32; blocks below the diagonal are left to the caller's zeros.
    """
    i_kk, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_kk // NKB, i_kk % NKB
    if i_j >= i_i:  # upper blocks only (no early return, a single exit for the compiler)
        o_i = i_i * BK + tl.arange(0, BK)
        o_j = i_j * BK + tl.arange(0, BK)
        m_i, m_j = o_i < k, o_j < k
        p_v = v + i_b.to(tl.int64) * k * n
        n_start = i_s * rows
        n_stop = tl.minimum(n_start + rows, n)
        b_g = tl.zeros([BK, BK], dtype=tl.float32)
        for i_n in range(n_start, n_stop, BN):
            o_n = i_n + tl.arange(0, BN)
            m_n = o_n < n_stop
            b_vi = tl.load(p_v + o_i[:, None] * n + o_n[None, :], mask=m_i[:, None] & m_n[None, :], other=0.0)
            b_vj = tl.load(p_v + o_j[:, None] * n + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0)
            # ieee: G decides how orthogonal Q is; 2 n k^2 flops are nothing next to the apply.
            b_g = tl.dot(b_vi, tl.trans(b_vj), b_g, input_precision="ieee")
        NS = tl.num_programs(1)
        p_g = g + (i_b.to(tl.int64) * NS + i_s) * k * k + o_i[:, None] * k + o_j[None, :]
        tl.store(p_g, b_g, mask=m_i[:, None] & m_j[None, :])


@triton.jit
def wy_solve_kernel(g, t, k, NS, BK: tl.constexpr):
    """``T`` from the partial Gram matrices by the LARFT recurrence; grid (b,).

    With ``tau_i = 2 / G_ii``: ``T_ii = tau_i`` and ``T[:i, i] = -tau_i T[:i, :i] G[:i, i]``.
    """
    i_b = tl.program_id(0)
    o_k = tl.arange(0, BK)
    m_k = o_k < k
    m_kk = m_k[:, None] & m_k[None, :]
    p_g = g + i_b.to(tl.int64) * NS * k * k + o_k[:, None] * k + o_k[None, :]
    b_g = tl.zeros([BK, BK], dtype=tl.float32)
    for i_s in range(NS):
        b_g += tl.load(p_g + i_s * k * k, mask=m_kk, other=0.0)
    b_t = tl.zeros([BK, BK], dtype=tl.float32)
    for i in range(k):
        b_gi = tl.sum(tl.where(o_k[None, :] == i, b_g, 0.0), axis=1)  # column i of G
        b_tau = 2.0 / tl.sum(tl.where(o_k == i, b_gi, 0.0))
        # T is still zero in columns >= i, so T @ g only sums over the first i columns.
        b_col = -b_tau * tl.sum(b_t * b_gi[None, :], axis=1)
        b_col = tl.where(o_k == i, b_tau, b_col)
        b_t = tl.where(o_k[None, :] == i, b_col[:, None], b_t)
    p_t = t + i_b.to(tl.int64) * k * k + o_k[:, None] * k + o_k[None, :]
    tl.store(p_t, b_t, mask=m_kk)


def gram(V: Tensor) -> Tensor:
    """Partial Gram matrices ``(b, NS, k, k)`` fp32 of contiguous ``V`` ``(b, k, n)`` (upper blocks)."""
    b, k, n = V.shape
    BK = block_k(k, cap=64)
    NKB = triton.cdiv(k, BK)
    NS = max(1, triton.cdiv(n, _GRAM_ROWS))
    rows = triton.cdiv(n, NS)
    g = torch.zeros(b, NS, k, k, dtype=torch.float32, device=V.device)
    gram_kernel[(NKB * NKB, NS, b)](V, g, n, k, rows, NKB, BK=BK, BN=_GRAM_BN)
    return g


def wy_factor(V: Tensor) -> Tensor:
    """Upper-triangular ``T`` ``(b, k, k)`` fp32 with ``Q = I - V^T T V``, for contiguous fp32 ``V``."""
    b, k, _ = V.shape
    if k == 0:
        return V.new_zeros(b, 0, 0)
    g = gram(V)
    if k <= MAX_SOLVE_K:
        T = torch.empty(b, k, k, dtype=torch.float32, device=V.device)
        wy_solve_kernel[(b,)](g, T, k, g.shape[1], BK=block_k(k, cap=MAX_SOLVE_K))
        return T
    G = g.sum(1)
    S = torch.triu(G, diagonal=1) + torch.diag_embed(0.5 * torch.diagonal(G, dim1=-2, dim2=-1))
    eye = torch.eye(k, dtype=S.dtype, device=S.device).expand_as(S)
    return torch.linalg.solve_triangular(S, eye, upper=True).contiguous()  # LAPACK returns column-major
