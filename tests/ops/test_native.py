"""Tests specific to the native backends (csrc/, loaded by mose_kernels._ext): the torch op contract
(opcheck: schemas, fake kernels, mutation and aliasing), torch.compile through the public API,
layouts and dtypes of the CPU kernels against the float64 references, and direct misuse of the ops.

The kernel-core grid (tests/ops/test_householder.py) also runs on the "cpu" backend; the C++ unit
tests of the tile maths and the CUDA compile check run from .ci/native_check.sh.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import mose_kernels as mk
from mose_kernels import reference
from mose_kernels.ops.householder.autograd import compute_dtype
from mose_kernels.testing import assert_close, make_vectors, make_weight, tolerance

pytestmark = pytest.mark.skipif(
    "cpu" not in mk.available_backends(),
    reason="native extension mose_kernels._C is not built (pip install --no-build-isolation -e .)",
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_ID = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=pytest.mark.skipif("cuda" not in mk.available_backends(), reason="no CUDA device or _C_cuda"),
    ),
]


def _canonical(b: int, n: int, m: int, k: int, dtype: torch.dtype, layout: str, device: str = "cpu"):
    """Canonical operands (W (b, n, m) in ``layout``, V, T) as the autograd wrapper passes them."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels support float32, float16 and bfloat16 W")
    acc = compute_dtype(dtype)
    if layout == "rows":
        W = make_weight(n, m, batch=(b,), dtype=dtype, device=device)
    elif layout == "columns":  # the right side of a row-major weight
        W = make_weight(m, n, batch=(b,), dtype=dtype, device=device).transpose(1, 2)
    else:  # every stride > 1
        W = make_weight(2 * n, 3 * m, batch=(b,), dtype=dtype, device=device)[:, ::2, ::3]
    V = make_vectors(k, n, batch=(b,), dtype=acc, device=device)
    return W, V, torch.ops.mose.wy_factor(V)


OPCHECK_CASES = [
    pytest.param(1, 9, 7, 3, torch.float32, "rows", id="b1-fp32-rows"),
    pytest.param(2, 12, 5, 4, torch.float64, "columns", id="b2-fp64-columns"),
    pytest.param(1, 6, 10, 2, torch.bfloat16, "strided", id="b1-bf16-strided"),
    pytest.param(1, 8, 8, 1, torch.float16, "rows", id="b1-fp16-rows"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,n,m,k,dtype,layout", OPCHECK_CASES)
def test_opcheck_every_op(b, n, m, k, dtype, layout, device):
    W, V, T = _canonical(b, n, m, k, dtype, layout, device)
    opcheck(torch.ops.mose.wy_factor.default, (V,))
    out = torch.empty_like(W)
    opcheck(torch.ops.mose.householder_fwd.default, (W, V, T, True, out))
    opcheck(torch.ops.mose.householder_fwd_.default, (W.clone(), V, T, False))
    opcheck(torch.ops.mose.project.default, (V, W))
    P = torch.randn(b, k, m, dtype=V.dtype, device=device)
    opcheck(torch.ops.mose.reflect_update.default, (W, V, P, torch.empty_like(W)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["rows", "columns", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("k", [3, 17, 70])  # 17 and 70: tensor cores for half W on CUDA
def test_forward_op_matches_reference_backend_in_and_out_of_place(layout, dtype, transpose, k, device):
    W, V, T = _canonical(2, 67, 45, k, dtype, layout, device)
    ref = mk.backends.get_backend("reference")
    want = torch.empty_like(W)
    X_ref = ref.forward(W, V, T, transpose, want)
    out = torch.empty_like(W)
    X = torch.ops.mose.householder_fwd(W, V, T, transpose, out)
    rtol = tolerance(dtype, 67)
    assert_close("out", want, out, rtol)
    assert_close("X", X_ref, X, tolerance(compute_dtype(dtype), 67))
    # A copy in W's layout (a strided W is copied densely; strided in-place views are tested below).
    W_inplace = W.transpose(1, 2).contiguous().transpose(1, 2) if layout == "columns" else W.clone()
    ptr, strides = W_inplace.data_ptr(), W_inplace.stride()
    torch.ops.mose.householder_fwd_(W_inplace, V, T, transpose)
    assert (W_inplace.data_ptr(), W_inplace.stride()) == (ptr, strides)
    assert_close("in place", want, W_inplace, rtol)


def test_in_place_writes_through_views_of_a_larger_buffer():
    """The in-place apply touches exactly the viewed elements of a strided slice."""
    buf = make_weight(40, 30)
    before = buf.clone()
    view = buf[5:35:3, 2:29:2]  # (10, 14), strides (90, 2)
    V = make_vectors(3, 10)
    want = reference.householder_apply_sequential(view.double(), V.double())
    mk.householder_apply_(view, V, backend="cpu")
    assert_close("view", want, view, tolerance(torch.float32, 10))
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[5:35:3, 2:29:2] = False
    assert torch.equal(buf[mask], before[mask])


def test_results_do_not_depend_on_the_thread_count():
    """Threads own whole column ranges, so the arithmetic per element is the same for any count."""
    W, V = make_weight(300, 520), make_vectors(5, 300)
    Wr = make_weight(520, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mk.householder_apply(W, V, backend="cpu"), mk.householder_apply(Wr, V, side="right", backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = mk.householder_apply(W, V, backend="cpu"), mk.householder_apply(Wr, V, side="right", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_torch_compile_fullgraph_through_householder_apply(side):
    W, V = make_weight(48, 24, dtype=torch.float64), make_vectors(5, 48 if side == "left" else 24)

    def fn(w, v):
        return mk.householder_apply(w, v, side=side, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    Wg, Vg = W.clone().requires_grad_(), V.double().clone().requires_grad_()
    We, Ve = W.clone().requires_grad_(), V.double().clone().requires_grad_()
    weight = torch.randn_like(W)
    (compiled(Wg, Vg) * weight).sum().backward()
    (fn(We, Ve) * weight).sum().backward()
    assert_close("dW", We.grad, Wg.grad, 1e-12)
    assert_close("dV", Ve.grad, Vg.grad, 1e-12)


def test_gradcheck_through_native_ops_with_a_sliced_weight():
    W = make_weight(18, 22, dtype=torch.float64)[::2, 1::2].requires_grad_()
    V = make_vectors(4, 9, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, v: mk.householder_apply(w, v, transpose=True, backend="cpu"), (W, V)
    )


@pytest.mark.parametrize("b,n,m,k", [(0, 5, 4, 2), (1, 0, 4, 2), (1, 5, 0, 2), (1, 5, 4, 0)], ids=str)
def test_empty_operands(b, n, m, k):
    W, V = torch.randn(b, n, m), torch.randn(b, k, n)
    T = torch.ops.mose.wy_factor(V)
    out = torch.full_like(W, float("nan"))
    X = torch.ops.mose.householder_fwd(W, V, T, False, out)
    assert X.shape == (b, k, m) and torch.equal(X, torch.zeros_like(X))
    assert torch.equal(out, W)  # Q = I when k = 0; nothing to write otherwise


def test_auto_prefers_the_native_cpu_backend():
    assert mk.backends.resolve_backend("auto", torch.device("cpu"), torch.bfloat16).name == "cpu"


@pytest.mark.parametrize(
    "make_args,match",
    [
        pytest.param(lambda W, V, T: (W, V.half(), T, False, torch.empty_like(W)), "float32 or float64", id="half-V"),
        pytest.param(lambda W, V, T: (W, V.double(), T.double(), False, torch.empty_like(W)), "vectors must be",
                     id="acc-mismatch"),
        pytest.param(lambda W, V, T: (W[:, :-1], V, T, False, torch.empty_like(W[:, :-1])), "does not match",
                     id="n-mismatch"),
        pytest.param(lambda W, V, T: (W, V, T[:, :1], False, torch.empty_like(W)), "T must be", id="bad-T"),
        pytest.param(lambda W, V, T: (W, V, T, False, torch.empty_like(W).double()), "out must match",
                     id="bad-out"),
        pytest.param(lambda W, V, T: (W, V[0], T, False, torch.empty_like(W)), r"\(b, k, n\)", id="rank"),
    ],
)
def test_direct_misuse_of_the_ops_names_the_problem(make_args, match):
    W, V, T = _canonical(1, 8, 6, 2, torch.float32, "rows")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mose.householder_fwd(*make_args(W, V, T))
