"""Kernel-core tests of the public API on every available backend.

Ground truth is float64: the dense product and the one-reflection-at-a-time reference of
``mose_kernels.reference``. Tolerances are relative RMS errors from ``mose_kernels.testing``.
Fast backends run the full shape grid; the Triton interpreter runs a covering subset.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mose_kernels as mk
from mose_kernels import reference
from mose_kernels.testing import assert_close, make_vectors, make_weight, relative_error, tolerance

BACKENDS = mk.available_backends()
SLOW_BACKENDS = {"triton"}  # interpreted on the CPU
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIDES_T = [("left", False), ("left", True), ("right", False), ("right", True)]
DTYPE_ID = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _supports(backend: str, dtype: torch.dtype) -> bool:
    return mk.backends.get_backend(backend).supports(torch.device("cpu"), dtype)


def _forward_cases() -> list:
    cases = []
    for backend in BACKENDS:
        if backend in SLOW_BACKENDS:
            grid = itertools.product([1, 63, 128], [1, 33], [0, 1, 3, 16, 65])
        else:
            grid = itertools.product([1, 7, 63, 128, 1000], [1, 33, 257], [0, 1, 3, 16, 65])
        for i, (n, m, k) in enumerate(grid):
            for j, (side, t) in enumerate(SIDES_T):
                dtype = DTYPES[(i + j) % len(DTYPES)]  # every dtype meets every side and shape class
                if not _supports(backend, dtype):
                    dtype = torch.float32
                cases.append(
                    pytest.param(
                        backend, n, m, k, side, t, dtype,
                        id=f"n{n}-m{m}-k{k}-{side}{'-T' if t else ''}-{DTYPE_ID[dtype]}-{backend}",
                    )
                )
    return cases


def _operands(n: int, m: int, k: int, side: str, dtype: torch.dtype, batch=()):
    V = make_vectors(k, n, batch=batch if len(batch) else ())
    W = make_weight(n, m, batch=batch, dtype=dtype) if side == "left" else make_weight(m, n, batch=batch, dtype=dtype)
    return W, V


@pytest.mark.parametrize("backend,n,m,k,side,transpose,dtype", _forward_cases())
def test_forward_matches_float64_references(backend, n, m, k, side, transpose, dtype, poisoned_empty):
    W, V = _operands(n, m, k, side, dtype)
    ref = reference.householder_apply_dense(W.double(), V.double(), side, transpose)
    got = mk.householder_apply(W, V, side=side, transpose=transpose, backend=backend)
    assert got.dtype == dtype and got.shape == W.shape
    assert_close("Y", ref, got, tolerance(dtype, n, k))
    seq = reference.householder_apply_sequential(W.double(), V.double(), side, transpose)
    assert_close("sequential vs dense", ref, seq, tolerance(torch.float64, n, k))
    inplace = W.clone()
    assert mk.householder_apply_(inplace, V, side=side, transpose=transpose, backend=backend) is inplace
    assert_close("in-place vs out-of-place", got.double(), inplace, tolerance(dtype, n, k))


def _grad_cases() -> list:
    cases = []
    for backend in BACKENDS:
        shapes = [(63, 33, 3), (100, 1, 16), (1, 7, 1)]
        if backend not in SLOW_BACKENDS:
            shapes += [(128, 257, 65), (7, 33, 17)]
        for (n, m, k), (side, t) in itertools.product(shapes, SIDES_T):
            case_id = f"n{n}-m{m}-k{k}-{side}{'-T' if t else ''}-{backend}"
            cases.append(pytest.param(backend, n, m, k, side, t, id=case_id))
    return cases


@pytest.mark.parametrize("backend,n,m,k,side,transpose", _grad_cases())
def test_gradients_match_float64_autograd(backend, n, m, k, side, transpose):
    W, V = _operands(n, m, k, side, torch.float32)
    dY = torch.randn_like(W)
    W64, V64 = W.double().requires_grad_(), V.double().requires_grad_()
    reference.householder_apply_wy(W64, V64, side, transpose).backward(dY.double())
    Wg, Vg = W.clone().requires_grad_(), V.clone().requires_grad_()
    mk.householder_apply(Wg, Vg, side=side, transpose=transpose, backend=backend).backward(dY)
    tol = tolerance(torch.float32, max(n, m), k) * 10  # gradients chain two applies and a k x k solve
    assert_close("dW", W64.grad, Wg.grad, tol)
    # n = 1: Q = -1 whatever v is, so dV is zero up to rounding; measure it against dV's natural
    # size ||dY|| ||W|| / ||V|| (a thousandth of it) instead of against that rounding noise.
    floor = 1e-3 * float(dY.norm() * W.norm() / V.norm())
    assert_close("dV", V64.grad, Vg.grad, tol, floor=floor)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _supports(b, torch.float64)])
@pytest.mark.parametrize("side,transpose", SIDES_T)
def test_gradcheck_float64(backend, side, transpose):
    W, V = _operands(9, 5, 4, side, torch.float64)
    V = V.double()
    torch.autograd.gradcheck(
        lambda w, v: mk.householder_apply(w, v, side=side, transpose=transpose, backend=backend),
        (W.requires_grad_(), V.requires_grad_()),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_vectors_only_with_frozen_weight(backend):
    W, V = _operands(63, 33, 5, "right", torch.float32)
    C = torch.randn(33, 63)  # (a norm would not depend on V: Q is orthogonal)
    V64 = V.double().requires_grad_()
    (reference.householder_apply_wy(W.double(), V64, "right", True) * C).sum().backward()
    Vg = V.clone().requires_grad_()
    (mk.householder_apply(W, Vg, side="right", transpose=True, backend=backend) * C).sum().backward()
    assert_close("dV", V64.grad, Vg.grad, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_vectors_and_weights(backend, dtype):
    W, V = _operands(63, 17, 3, "left", dtype, batch=(2, 3))
    got = mk.householder_apply(W, V, backend=backend)
    for i, j in itertools.product(range(2), range(3)):
        ref = reference.householder_apply_dense(W[i, j].double(), V[i, j].double())
        assert_close(f"batch {i},{j}", ref, got[i, j], tolerance(dtype, 63))
    inplace = W.clone()
    mk.householder_apply_(inplace, V, backend=backend)
    assert torch.equal(inplace, got) or relative_error(inplace, got) < tolerance(dtype, 63)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_q_broadcast_over_a_batch_of_weights(backend):
    V = make_vectors(4, 31)
    W = make_weight(30, 31, batch=(3,))
    got = mk.householder_apply(W, V, side="right", transpose=True, backend=backend)
    for i in range(3):
        ref = reference.householder_apply_dense(W[i].double(), V.double(), "right", True)
        assert_close(f"batch {i}", ref, got[i], tolerance(torch.float32, 31))
    Wg, Vg = W.clone().requires_grad_(), V.clone().requires_grad_()
    mk.householder_apply(Wg, Vg, side="right", transpose=True, backend=backend).sum().backward()
    W64, V64 = W.double().requires_grad_(), V.double().requires_grad_()
    reference.householder_apply_wy(W64, V64, "right", True).sum().backward()
    assert_close("dV summed over the batch", V64.grad, Vg.grad, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side,transpose", SIDES_T)
def test_strided_and_sliced_weights(backend, side, transpose):
    big = make_weight(130, 90)
    W = big[1::2, 3:80] if side == "left" else big[3:80, 1::2].t().t()[:, :65]
    n = W.shape[0] if side == "left" else W.shape[1]
    V = make_vectors(6, n)
    ref = reference.householder_apply_dense(W.double(), V.double(), side, transpose)
    assert_close("Y", ref, mk.householder_apply(W, V, side=side, transpose=transpose, backend=backend), 1e-5)
    Wt = W.t().contiguous().t()  # column-major layout
    assert_close("Y col-major", ref, mk.householder_apply(Wt, V, side=side, transpose=transpose, backend=backend), 1e-5)
    before = big.clone()
    mk.householder_apply_(W, V, side=side, transpose=transpose, backend=backend)
    assert_close("in place on a view", ref, W, 1e-5)
    mask = torch.ones_like(big, dtype=torch.bool)
    (mask[1::2, 3:80] if side == "left" else mask[3:80, 1::2][:, :65]).fill_(False)
    assert torch.equal(big[mask], before[mask]), "in-place apply wrote outside the view"


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_preserved_and_inverse_restores(backend):
    W = make_weight(200, 40)
    V = make_vectors(16, 200)
    Y = mk.householder_apply(W, V, backend=backend)
    assert abs(torch.linalg.norm(Y) / torch.linalg.norm(W) - 1) < 1e-5
    assert_close("column norms", torch.linalg.norm(W, dim=0), torch.linalg.norm(Y, dim=0), 1e-5)
    back = mk.householder_apply(Y, V, transpose=True, backend=backend)
    assert_close("Q^T Q W", W, back, 1e-5)
    # The reflections in reverse order form Q^T as well.
    assert_close("reversed", W, mk.householder_apply(Y, V.flip(0), backend=backend), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_reflections_is_identity(backend):
    W = make_weight(10, 4)
    V = torch.empty(0, 10)
    out = mk.householder_apply(W, V, backend=backend)
    assert torch.equal(out, W) and out.data_ptr() != W.data_ptr()
    assert mk.householder_apply_(W.clone(), V, backend=backend).equal(W)


def test_wy_factor_matches_reference_and_reconstructs_q():
    V = make_vectors(17, 50, dtype=torch.float64)
    T = mk.wy_factor(V)
    assert T.shape == (17, 17) and T.dtype == torch.float64
    assert torch.equal(T, torch.triu(T))
    assert_close("T", reference.wy_factor_ref(V), T, 1e-12)
    Q = torch.eye(50, dtype=torch.float64) - V.T @ T @ V
    assert_close("Q", reference.householder_matrix_ref(V), Q, 1e-12)
    assert mk.wy_factor(V.float()).dtype == torch.float32
    assert mk.wy_factor(V.to(torch.bfloat16)).dtype == torch.float32
    assert mk.wy_factor(make_vectors(3, 8, batch=(2,))).shape == (2, 3, 3)


def test_householder_matrix_is_orthogonal_and_ordered():
    V = make_vectors(5, 12, dtype=torch.float64)
    Q = mk.householder_matrix(V)
    assert_close("Q Q^T", torch.eye(12, dtype=torch.float64), Q @ Q.T, 1e-13)
    H = [torch.eye(12, dtype=torch.float64) - 2 * torch.outer(v, v) / v.dot(v) for v in V]
    assert_close("H1 H2 ... Hk", torch.linalg.multi_dot(H), Q, 1e-13)
    assert torch.equal(mk.householder_matrix(torch.empty(0, 4)), torch.eye(4))


def test_agrees_with_torch_linalg_householder_product():
    n, k = 40, 6
    A = torch.randn(n, k, dtype=torch.float64)
    V = torch.zeros(k, n, dtype=torch.float64)
    for i in range(k):  # LAPACK storage: implicit unit diagonal, zeros above it
        V[i, i] = 1.0
        V[i, i + 1 :] = A[i + 1 :, i]
    tau = 2.0 / (V * V).sum(-1)
    lapack_q = torch.linalg.householder_product(A, tau)  # first k columns of H_1 ... H_k
    assert_close("Q[:, :k]", lapack_q, mk.householder_matrix(V)[:, :k], 1e-13)


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda: (torch.randn(5, 3), torch.zeros(2, 5)), ValueError, "zero-norm"),
        (lambda: (torch.randn(5, 3), torch.randn(2, 4)), ValueError, "n = V.shape"),
        (lambda: (torch.randn(5, 3), torch.randn(5)), ValueError, r"shape \(k, n\)"),
        (lambda: (torch.randn(5), torch.randn(2, 5)), ValueError, "matrix"),
        (lambda: (torch.randn(5, 3), torch.randn(2, 5, device="meta")), ValueError, "same device"),
        (lambda: (torch.ones(5, 3, dtype=torch.int64), torch.randn(2, 5)), TypeError, "dtype"),
        (lambda: (torch.randn(5, 3), torch.ones(2, 5, dtype=torch.int32)), TypeError, "floating"),
        (lambda: (torch.randn(5, 3), torch.tensor([[1.0, float("nan"), 0, 0, 0]])), ValueError, "NaN or Inf"),
        (lambda: (torch.randn(5, 3), torch.tensor([[1.0, float("inf"), 0, 0, 0]])), ValueError, "NaN or Inf"),
        (lambda: (torch.randn(2, 5, 3), torch.randn(3, 2, 5)), ValueError, "leading dimensions"),
        (lambda: ([[1.0]], torch.randn(1, 1)), TypeError, "torch.Tensor"),
    ],
    ids=["zero-row", "mismatched-n", "V-rank", "W-rank", "mixed-devices", "int-W", "int-V", "nan", "inf",
         "batch-mismatch", "not-a-tensor"],
)
def test_bad_input_is_rejected_with_a_clear_error(make_args, exc, match):
    W, V = make_args()
    with pytest.raises(exc, match=match):
        mk.householder_apply(W, V)
    if isinstance(W, torch.Tensor):
        with pytest.raises(exc, match=match):
            mk.householder_apply_(W, V)


def test_bad_options_are_rejected():
    W, V = torch.randn(5, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match="side"):
        mk.householder_apply(W, V, side="top")
    with pytest.raises(TypeError, match="transpose"):
        mk.householder_apply(W, V, transpose=1)
    with pytest.raises(ValueError, match="unknown backend"):
        mk.householder_apply(W, V, backend="fortran")
    if "cuda" not in BACKENDS:
        with pytest.raises(ValueError, match="not available"):
            mk.householder_apply(W, V, backend="cuda")


def test_in_place_refuses_tensors_that_need_grad():
    W = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        mk.householder_apply_(W, torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="not differentiable"):
        mk.householder_apply_(torch.randn(5, 3), torch.randn(2, 5, requires_grad=True))
    with torch.no_grad():
        mk.householder_apply_(W, torch.randn(2, 5))


def test_half_weight_with_float32_vectors_rounds_once():
    W = make_weight(300, 64, dtype=torch.bfloat16)
    V = make_vectors(8, 300)
    exact = reference.householder_apply_dense(W.double(), V.double())
    got = mk.householder_apply(W, V)
    assert torch.equal(got, exact.to(torch.bfloat16)) or relative_error(got, exact) <= relative_error(
        exact.to(torch.bfloat16), exact
    ) * 1.05


def test_available_backends_lists_reference():
    assert "reference" in mk.available_backends()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW_BACKENDS])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """Dynamo traces the public API without graph breaks (aot_eager: tracing and autograd, no codegen)."""
    W, V = make_weight(64, 32), make_vectors(4, 64)
    compiled = torch.compile(
        lambda w, v: mk.householder_apply(w, v, transpose=True, backend=backend), fullgraph=True, backend="aot_eager"
    )
    Wg, Vg = W.clone().requires_grad_(), V.clone().requires_grad_()
    (compiled(Wg, Vg) * W).sum().backward()
    We, Ve = W.clone().requires_grad_(), V.clone().requires_grad_()
    (mk.householder_apply(We, Ve, transpose=True, backend=backend) * W).sum().backward()
    assert_close("dV", Ve.grad, Vg.grad, 1e-6)
    assert_close("dW", We.grad, Wg.grad, 1e-6)


def test_auto_backend_passes_over_backends_beyond_their_k_limit():
    from mose_kernels.backends import resolve_backend

    cpu = torch.device("cpu")
    for name in BACKENDS:
        limit = mk.backends.get_backend(name).auto_max_k
        if limit is not None:
            assert resolve_backend("auto", cpu, torch.float32, limit + 1).name != name
    assert resolve_backend("auto", cpu, torch.float32, 10**6).name == "reference"
