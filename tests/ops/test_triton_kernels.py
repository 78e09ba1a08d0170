"""Kernel-level tests of the Triton backend (``mose_kernels.ops.householder.wy_triton``).

Each kernel path (fused stripe forward, split project/update forward with and without split-n
atomics, one-pass dV backward, Gram + LARFT factor) is checked on awkward sizes against float64
references, with the tolerances of :mod:`mose_kernels.testing`. On a CPU the kernels run in the
Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), so the grids are a covering
subset rather than a full product.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mose_kernels as mk
from mose_kernels import reference
from mose_kernels.backends import get_backend
from mose_kernels.testing import assert_close, make_vectors, make_weight, tolerance

if get_backend("triton") is None:
    pytest.skip(
        "triton backend unavailable (needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported)",
        allow_module_level=True,
    )

from mose_kernels.ops.householder import wy_triton  # needs triton: imported after the skip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LAYOUTS = ["contiguous", "transposed", "sliced", "inplace"]
# (n, m, k): awkward sizes; 1500 x 1 makes the split path's n-split (atomics) run, k = 130 the
# k-blocked split path (beyond the fused kernel's 128).
SHAPES = [
    (1, 1, 1), (1, 33, 3), (7, 257, 1), (7, 1, 16), (63, 33, 17), (63, 257, 3), (100, 1, 65),
    (100, 33, 16), (100, 257, 65), (1500, 1, 3), (100, 33, 130),
]


def _tol(dtype: torch.dtype, n: int, k: int) -> float:
    """Interpreter and fp32 GPU runs ("tf32x3") keep fp32 accuracy; half GPU runs use tf32 dots."""
    rtol = tolerance(dtype, n, k)
    if DEVICE == "cuda" and dtype != torch.float32:
        rtol = max(rtol, mk.testing.GPU_TF32_TOLERANCE)
    return rtol


def _weight(n: int, m: int, b: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """Canonical ``(b, n, m)`` weight with the strides ``layout`` names."""
    if layout == "transposed":  # the right-side view: n is the contiguous axis
        return make_weight(m, n, batch=(b,), dtype=dtype, device=DEVICE).transpose(1, 2)
    if layout == "sliced":  # every other column of a wider matrix
        return make_weight(n, 2 * m, batch=(b,), dtype=dtype, device=DEVICE)[:, :, ::2]
    return make_weight(n, m, batch=(b,), dtype=dtype, device=DEVICE)


def _ref_forward(W: torch.Tensor, V: torch.Tensor, transpose: bool) -> torch.Tensor:
    return torch.stack([
        reference.householder_apply_dense(w.double(), v.double(), "left", transpose) for w, v in zip(W, V, strict=True)
    ])


def _forward_cases() -> list:
    cases = []
    variants = list(itertools.product([False, True], DTYPES, LAYOUTS))
    for i, (n, m, k) in enumerate(SHAPES):
        paths = [False] if k > 128 else [True, False]
        for path in paths:
            for j in range(2):  # two (transpose, dtype, layout) variants per shape and path
                t, dtype, layout = variants[(5 * i + 7 * j + 3 * path) % len(variants)]
                b = 2 if (i + j) % 3 == 0 else 1
                cases.append(pytest.param(
                    n, m, k, b, t, dtype, layout, path,
                    id=f"n{n}-m{m}-k{k}-b{b}{'-T' if t else ''}-{DTYPE_ID[dtype]}-{layout}-"
                       f"{'fused' if path else 'split'}",
                ))
    return cases


@pytest.mark.parametrize(
    "k,n", [(1, 1), (3, 7), (16, 63), (17, 100), (64, 100), (65, 100), (17, 4100), (130, 300)],
    ids=lambda v: str(v),
)
def test_factor_matches_reference(k, n, poisoned_empty):
    V = make_vectors(k, n, batch=(2,), device=DEVICE)
    T = wy_triton.wy_factor(V)
    assert T.shape == (2, k, k) and T.dtype == torch.float32 and T.is_contiguous()
    assert_close("T", reference.wy_factor_ref(V.double()), T, tolerance(torch.float32, n, k))
    assert torch.all(torch.tril(T, diagonal=-1) == 0)


@pytest.mark.parametrize("n,m,k,b,transpose,dtype,layout,fused", _forward_cases())
def test_forward(n, m, k, b, transpose, dtype, layout, fused, poisoned_empty):
    W = _weight(n, m, b, dtype, layout)
    V = make_vectors(k, n, batch=(b,), device=DEVICE)
    ref = _ref_forward(W, V, transpose)
    W_before = W.clone()
    T = wy_triton.wy_factor(V)
    out = W if layout == "inplace" else torch.full_like(W, float("nan"))  # poisoned
    X = wy_triton.forward(W, V, T, transpose, out, fused=fused)
    assert_close("Y", ref, out, _tol(dtype, n, k))
    assert_close("X", V.double() @ W_before.double(), X, _tol(torch.float32, n, 1))
    if layout != "inplace":
        assert torch.equal(W, W_before), "out-of-place forward modified W"


def _backward_cases() -> list:
    shapes = [(2, 33, 3), (7, 1, 16), (63, 33, 17), (100, 257, 65), (1100, 1, 3), (100, 33, 130), (63, 257, 1)]
    cases = []
    for i, (n, m, k) in enumerate(shapes):
        t, dtype = i % 2 == 1, DTYPES[i % len(DTYPES)]
        cases.append(pytest.param(n, m, k, t, dtype, id=f"n{n}-m{m}-k{k}{'-T' if t else ''}-{DTYPE_ID[dtype]}"))
    return cases


@pytest.mark.parametrize("n,m,k,transpose,dtype", _backward_cases())
def test_backward_matches_float64_autograd(n, m, k, transpose, dtype, poisoned_empty):
    """Both gradients: one dW + dV pass for k <= 128, dW through the forward beyond."""
    b = 2
    W = _weight(n, m, b, dtype, "transposed" if transpose else "contiguous")
    V = make_vectors(k, n, batch=(b,), device=DEVICE)
    dY = make_weight(n, m, batch=(b,), dtype=dtype, device=DEVICE)
    W64, V64 = W.double().requires_grad_(), V.double().requires_grad_()
    T64 = reference.wy_factor_ref(V64)
    A64 = T64.transpose(-1, -2) if transpose else T64
    (W64 - V64.transpose(-1, -2) @ (A64 @ (V64 @ W64))).backward(dY.double())

    T = wy_triton.wy_factor(V)
    X = wy_triton.forward(W, V, T, transpose, torch.empty_like(W))
    dW, dV = wy_triton.backward(dY, W, V, T, X, transpose, True, True)
    assert dW.dtype == dtype and dV.dtype == torch.float32
    assert_close("dW", W64.grad, dW, _tol(dtype, n, k))
    assert_close("dV", V64.grad, dV, _tol(torch.float32, n * m, k))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_backward_computes_only_what_is_needed(fused, poisoned_empty):
    """dW alone comes from the forward on dY (either path), dV alone from project + the dV pass."""
    n, m, k = 63, 33, 17
    W = make_weight(n, m, batch=(1,), device=DEVICE)
    V = make_vectors(k, n, batch=(1,), device=DEVICE)
    dY = make_weight(n, m, batch=(1,), device=DEVICE)
    T = wy_triton.wy_factor(V)
    X = wy_triton.forward(W, V, T, True, torch.empty_like(W), fused=fused)
    dW, dV = wy_triton.backward(dY, W, V, T, X, True, True, True, fused=fused)
    dW_only, none_v = wy_triton.backward(dY, W, V, T, X, True, True, False, fused=fused)
    none_w, dV_only = wy_triton.backward(dY, W, V, T, X, True, False, True, fused=fused)
    assert none_v is None and none_w is None
    assert_close("dW (dW only)", dW, dW_only, _tol(torch.float32, n, k))
    assert_close("dV (dV only)", dV, dV_only, _tol(torch.float32, n * m, k))


def test_backward_accepts_expanded_gradient():
    """``loss = Y.sum()`` hands the backward a zero-stride ``dY``."""
    n, m, k = 63, 33, 16
    W = make_weight(n, m, batch=(1,), device=DEVICE)
    V = make_vectors(k, n, batch=(1,), device=DEVICE)
    dY = torch.ones(1, 1, 1, device=DEVICE).expand(1, n, m)
    T = wy_triton.wy_factor(V)
    X = wy_triton.forward(W, V, T, False, torch.empty_like(W))
    dW, dV = wy_triton.backward(dY, W, V, T, X, False, True, True)
    dW_ref, dV_ref = get_backend("reference").backward(dY.contiguous(), W, V, T, X, False, True, True)
    assert_close("dW", dW_ref, dW, _tol(torch.float32, n, k))
    assert_close("dV", dV_ref, dV, _tol(torch.float32, n * m, k))


@pytest.mark.parametrize("side,transpose", [("left", False), ("right", True)])
def test_public_api_gradients_match_reference_backend(side, transpose):
    n, m, k = 63, 33, 17
    W = make_weight(n, m, device=DEVICE) if side == "left" else make_weight(m, n, device=DEVICE)
    V = make_vectors(k, n, device=DEVICE)
    grads = {}
    for backend in ("reference", "triton"):
        Wg, Vg = W.clone().requires_grad_(), V.clone().requires_grad_()
        Y = mk.householder_apply(Wg, Vg, side=side, transpose=transpose, backend=backend)
        (Y * torch.linspace(-1, 1, Y.numel(), device=DEVICE).reshape(Y.shape)).sum().backward()
        grads[backend] = (Y.detach(), Wg.grad, Vg.grad)
    for name, ref, got in zip(("Y", "dW", "dV"), grads["reference"], grads["triton"], strict=True):
        assert_close(name, ref, got, _tol(torch.float32, n * m, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
def test_public_inplace_right_side_equals_out_of_place(dtype):
    m, n, k = 33, 100, 16
    W = make_weight(m, n, dtype=dtype, device=DEVICE)
    V = make_vectors(k, n, device=DEVICE)
    expected = mk.householder_apply(W, V, side="right", transpose=True, backend="triton")
    ptr = W.data_ptr()
    got = mk.householder_apply_(W, V, side="right", transpose=True, backend="triton")
    assert got.data_ptr() == ptr
    assert_close("in place", expected, got, tolerance(dtype) / 4)


def test_path_choice():
    dev = torch.device(DEVICE)
    assert wy_triton.use_fused(1, 4096, 64, dev)  # LLaMA3-8B down_proj: 128 stripes
    assert not wy_triton.use_fused(1, 4096, 129, dev)  # k beyond the register tile
    assert not wy_triton.use_fused(1, 1, 3, dev)  # one stripe: split path


def _op_args(name: str) -> tuple:
    n, m, k = 63, 33, 5
    W = make_weight(n, m, batch=(2,), device=DEVICE)
    V = make_vectors(k, n, batch=(2,), device=DEVICE)
    T = wy_triton.wy_factor(V)
    X = V @ W
    return {
        "wy_factor": (V,),
        "apply_fwd": (W, V, T, True, torch.empty_like(W)),
        "apply_fwd_": (W.transpose(1, 2).contiguous().transpose(1, 2), V, T, False),
        "apply_bwd": (torch.randn_like(W), W, V, T, X, False, True, True),
    }[name]


@pytest.mark.parametrize("name", ["wy_factor", "apply_fwd", "apply_fwd_", "apply_bwd"])
def test_custom_ops_pass_opcheck(name):
    """Schemas, fake (meta) implementations and mutation annotations of the torch.ops.mose_triton ops."""
    torch.library.opcheck(getattr(torch.ops.mose_triton, name), _op_args(name))


@pytest.mark.parametrize("side,transpose", [("left", False), ("right", True)])
def test_compile_fullgraph_forward_and_backward(side, transpose):
    """The autograd wrapper over the triton backend compiles without graph breaks into graphs that
    call the opaque ops, and matches eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from mose_kernels.ops.householder import autograd

    backend = get_backend("triton")
    n, m, k = 63, 33, 5
    W = make_weight(n, m, device=DEVICE) if side == "left" else make_weight(m, n, device=DEVICE)
    V = make_vectors(k, n, device=DEVICE)

    def loss(W, V):
        Y = autograd.apply(W, V, side, transpose, backend)
        return (Y * Y.detach().roll(1, 0)).sum(), Y

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    compiled = torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph))
    results = []
    for fn in (loss, compiled):
        Wg, Vg = W.clone().requires_grad_(), V.clone().requires_grad_()
        value, Y = fn(Wg, Vg)
        value.backward()
        results.append((Y.detach(), Wg.grad, Vg.grad))
    for name, ref, got in zip(("Y", "dW", "dV"), *results, strict=True):
        assert_close(name, ref, got, _tol(torch.float32, n * m, k))
    traced = "".join(graphs)
    for op in ("wy_factor", "apply_fwd", "apply_bwd"):
        assert f"mose_triton.{op}" in traced, f"torch.ops.mose_triton.{op} missing from the compiled graphs"


def _autotuned_kernels() -> list:
    from mose_kernels.ops.householder import triton_apply, triton_apply_bwd, triton_project, triton_update

    return [
        pytest.param(triton_apply.wy_apply_fwd_kernel, id="fused_fwd"),
        pytest.param(triton_project.project_kernel, id="project"),
        pytest.param(triton_update.update_kernel, id="update"),
        pytest.param(triton_apply_bwd.wy_apply_bwd_kernel, id="bwd"),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled autotune configs need a GPU (the interpreter runs one config)")
@pytest.mark.parametrize("kernel", _autotuned_kernels())
@pytest.mark.parametrize("k", [16, 65], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
def test_every_autotune_config_is_correct(kernel, k, dtype, monkeypatch):
    """Run each config alone (flash-linear-attention records Hopper miscompiles for some tiles)."""
    n, m, b = 1000, 257, 2
    W = make_weight(n, m, batch=(b,), dtype=dtype, device=DEVICE)
    V = make_vectors(k, n, batch=(b,), device=DEVICE)
    dY = make_weight(n, m, batch=(b,), dtype=dtype, device=DEVICE)
    W64, V64 = W.double().requires_grad_(), V.double().requires_grad_()
    T64 = reference.wy_factor_ref(V64)
    Y64 = W64 - V64.transpose(-1, -2) @ (T64 @ (V64 @ W64))
    Y64.backward(dY.double())
    T = wy_triton.wy_factor(V)
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [config])
        for fused in (True, False):
            Y = torch.full_like(W, float("nan"))
            X = wy_triton.forward(W, V, T, False, Y, fused=fused)
            dW, dV = wy_triton.backward(dY, W, V, T, X, False, True, True, fused=fused)
            label = f"{config} fused={fused}"
            assert_close(f"Y {label}", Y64.detach(), Y, _tol(dtype, n, k))
            assert_close(f"dW {label}", W64.grad, dW, _tol(dtype, n, k))
            assert_close(f"dV {label}", V64.grad, dV, _tol(torch.float32, n * m, k))
