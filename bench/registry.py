"""What the benchmark measures: operations, shapes and providers (competitors), with cost models.

Every provider computes the same mathematical result on the same inputs:
``side="left"``: ``Y = Q W`` with ``W`` ``(n, m)``; ``side="right"``: ``Y = W Q^T`` with ``W`` ``(m, n)``
(the input-side edit of an ``nn.Linear`` weight), ``Q = H_1 ... H_k`` from ``V`` ``(k, n)``.
Shapes are ``(n, m)`` of a model's MLP output projection: ``n`` the intermediate size (the side the
reflections act on), ``m`` the model width.

The cost models give (a) the *floor* of an operation (the fewest bytes over the measured copy
bandwidth, or the compact-WY FLOPs over the measured GEMM rate, whichever is larger) and (b) a rough
time and memory estimate per provider, used only to skip hopeless rows (printed instead of run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mose_kernels import householder_apply, householder_apply_, reference
from mose_kernels.backends import available_backends, get_backend

SHAPES: dict[str, tuple[int, int]] = {
    "smollm2-135m": (1536, 576),
    "gpt2-xl": (6400, 1600),
    "llama3-8b": (14336, 4096),
    "qwen2.5-7b": (18944, 3584),
    "llama3-70b": (28672, 8192),
}
QUICK_SHAPES: dict[str, tuple[int, int]] = {"tiny": (96, 33), "small": (300, 80)}
K_VALUES = (1, 4, 16, 64, 256)
QUICK_K_VALUES = (1, 5)

# op -> (description, sides it is run on by default)
OPS: dict[str, str] = {
    "wy_factor": "T from V (k x k), side-independent",
    "fwd": "out-of-place apply",
    "fwd_inplace": "in-place apply (W overwritten)",
    "bwd_V": "backward, gradient of V only (W frozen); time of autograd.grad after the forward",
    "bwd_VW": "backward, gradients of V and W",
}
BACKWARD_OPS = ("bwd_V", "bwd_VW")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One row family: an operation on one shape, ``k``, side and dtype."""

    op: str
    shape: str
    n: int
    m: int
    k: int
    side: str
    dtype: torch.dtype

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def w_shape(self) -> tuple[int, int]:
        return (self.n, self.m) if self.side == "left" else (self.m, self.n)


@dataclass(frozen=True)
class Ceilings:
    """Machine ceilings measured in the same run: copy bandwidth (bytes read + written per second)
    and GEMM rate per dtype (FLOP/s)."""

    copy_bytes_per_s: float
    gemm_flops_per_s: dict[str, float]

    def gemm(self, dtype: torch.dtype) -> float:
        name = next(key for key, value in DTYPES.items() if value == dtype)
        return self.gemm_flops_per_s.get(name, self.gemm_flops_per_s["fp32"])


def min_bytes(case: Case) -> int:
    """Fewest bytes an operation must move: each input read once, each output written once."""
    nm, kn, km = case.n * case.m * case.elem, case.k * case.n * 4, case.k * case.m * 4
    if case.op == "wy_factor":
        return kn + case.k * case.k * 4
    if case.op in ("fwd", "fwd_inplace"):
        return 2 * nm + kn  # read W, write Y (+ V)
    if case.op == "bwd_V":
        return 2 * nm + 2 * kn + km  # read dY and W, read V, write dV, read X
    if case.op == "bwd_VW":
        return 3 * nm + 2 * kn + km  # + write dW
    raise ValueError(f"unknown op {case.op!r}")


def wy_flops(case: Case) -> float:
    """FLOPs of the compact-WY algorithm (the useful work every provider is credited with)."""
    n, m, k = case.n, case.m, case.k
    gram = 2.0 * n * k * k
    if case.op == "wy_factor":
        return gram + k**3 / 3.0
    if case.op in ("fwd", "fwd_inplace"):
        return 4.0 * n * m * k + gram + 2.0 * k * k * m
    if case.op == "bwd_V":
        return 6.0 * n * m * k + 2.0 * gram
    if case.op == "bwd_VW":
        return 8.0 * n * m * k + 2.0 * gram
    raise ValueError(f"unknown op {case.op!r}")


def floor_seconds(case: Case, ceil: Ceilings) -> float:
    """The floor: max(min bytes / copy bandwidth, WY FLOPs / GEMM rate)."""
    return max(min_bytes(case) / ceil.copy_bytes_per_s, wy_flops(case) / ceil.gemm(case.dtype))


@dataclass
class Inputs:
    """Tensors of one input set (W, V, and the LAPACK form of V where a provider needs it)."""

    W: Tensor
    V: Tensor
    lapack: tuple[Tensor, Tensor] | None = None


Runner = Callable[[Inputs], object]


@dataclass(frozen=True)
class Provider:
    """A competitor: how to run each op, which ops/devices/dtypes it supports, and its cost model
    (``estimate(case, ceilings) -> (seconds per call, bytes of extra memory)``)."""

    name: str
    description: str
    ops: tuple[str, ...]
    fn: Callable[[Case], Callable[[Tensor, Tensor, Inputs], Tensor]]
    estimate: Callable[[Case, Ceilings], tuple[float, float]]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype
    needs_lapack: bool = False

    def supports(self, case: Case, device: torch.device) -> str | None:
        """``None`` if the provider runs ``case`` on ``device``, else the reason it does not."""
        if case.op not in self.ops:
            return f"{self.name} has no {case.op}"
        if self.dtypes is not None and case.dtype not in self.dtypes:
            return f"{self.name} supports {[str(d) for d in self.dtypes]} only"
        return None


# ----------------------------------------------------------------------------- cost models
def _stream(case: Case, ceil: Ceilings, passes: float) -> float:
    return passes * case.n * case.m * case.elem / ceil.copy_bytes_per_s


def _wy_estimate(case: Case, ceil: Ceilings) -> tuple[float, float]:
    mult = 1.0 if case.op in ("fwd", "fwd_inplace", "wy_factor") else 2.5
    t = mult * max(_stream(case, ceil, 4), 4.0 * case.n * case.m * case.k / ceil.gemm(case.dtype)) + 1e-4
    mem = 0 if case.op == "fwd_inplace" else case.n * case.m * case.elem * (1 if case.op == "fwd" else 2)
    return t, mem


def _ormqr_estimate(case: Case, ceil: Ceilings) -> tuple[float, float]:
    """xORMQR runs at ~5 % of the floor on the development machine (measured): 5x the WY model."""
    t, mem = _wy_estimate(case, ceil)
    return 5.0 * t, mem


def _sequential_estimate(case: Case, ceil: Ceilings) -> tuple[float, float]:
    mult = 1.0 if case.op == "fwd" else 3.0
    mem_mult = 2 if case.op == "fwd" else case.k + 2  # autograd keeps every intermediate Y
    # 4 passes per reflector plus a fresh n x m result each time (page faults): ~4x the bare model
    return mult * case.k * _stream(case, ceil, 16), mem_mult * case.n * case.m * case.elem


def _dense_estimate(case: Case, ceil: Ceilings) -> tuple[float, float]:
    n2 = case.n * case.n
    build = case.k * 16.0 * n2 / ceil.copy_bytes_per_s
    gemm = 2.0 * n2 * case.m / ceil.gemm(case.dtype)
    if case.op == "fwd":
        return build + gemm, 3 * n2 * case.elem + case.n * case.m * case.elem
    # autograd saves one n x n matrix per reflection and backpropagates through every one
    return 3 * (build + gemm), (case.k + 3) * n2 * case.elem + 2 * case.n * case.m * case.elem


def _orgqr_estimate(case: Case, ceil: Ceilings) -> tuple[float, float]:
    n2 = case.n * case.n
    t = (4.0 * n2 * case.k + 2.0 * n2 * case.m) / ceil.gemm(torch.float32) + 3 * n2 * 4 / ceil.copy_bytes_per_s
    return t, 2 * n2 * 4 + case.n * case.m * 4


# ----------------------------------------------------------------------------- implementations
def _transpose(case: Case) -> bool:
    return case.side == "right"  # right: W Q^T (input-side edit); left: Q W


def _peft_hra_matrix(V: Tensor, dtype: torch.dtype) -> Tensor:
    """Q = H_1 ... H_k built densely the way PEFT's HRA layer does (normalise the vectors, start
    from the identity, one rank-1 update of the n x n matrix per reflection)."""
    U = V.to(dtype).T  # PEFT stores the vectors as columns (n, r)
    U = U / U.norm(dim=0)
    Q = torch.eye(U.shape[0], dtype=dtype, device=U.device)
    for i in range(U.shape[1]):
        u = U[:, i].view(-1, 1)
        Q = Q - 2 * Q @ u @ u.t()
    return Q


def _peft_hra(case: Case) -> Callable[[Tensor, Tensor, Inputs], Tensor]:
    def run(W: Tensor, V: Tensor, _: Inputs) -> Tensor:
        Q = _peft_hra_matrix(V, W.dtype)
        return W @ Q.t() if case.side == "right" else Q @ W

    return run


def _reference(fn: Callable[..., Tensor]) -> Callable[[Case], Callable[[Tensor, Tensor, Inputs], Tensor]]:
    def make(case: Case) -> Callable[[Tensor, Tensor, Inputs], Tensor]:
        t = _transpose(case)
        if case.op == "wy_factor":
            return lambda W, V, _: reference.wy_factor_ref(V)
        return lambda W, V, _: fn(W, V, case.side, t)

    return make


def _lapack_orgqr(case: Case) -> Callable[[Tensor, Tensor, Inputs], Tensor]:
    def run(W: Tensor, V: Tensor, inp: Inputs) -> Tensor:
        A, tau = inp.lapack
        A_full = torch.nn.functional.pad(A, (0, A.shape[0] - A.shape[1]))  # n x n, zero columns
        Q = torch.linalg.householder_product(A_full, tau)
        return W @ Q.t() if case.side == "right" else Q @ W

    return run


def _lapack_ormqr(case: Case) -> Callable[[Tensor, Tensor, Inputs], Tensor]:
    def run(W: Tensor, V: Tensor, inp: Inputs) -> Tensor:
        A, tau = inp.lapack
        if case.side == "right":
            return torch.ormqr(A, tau, W, left=False, transpose=True)
        return torch.ormqr(A, tau, W, left=True, transpose=False)

    return run


def _mose(backend: str) -> Callable[[Case], Callable[[Tensor, Tensor, Inputs], Tensor]]:
    def make(case: Case) -> Callable[[Tensor, Tensor, Inputs], Tensor]:
        t = _transpose(case)
        if case.op == "wy_factor":
            factor = get_backend(backend).factor
            return lambda W, V, _: factor(V.to(torch.float32).unsqueeze(0))
        if case.op == "fwd_inplace":
            return lambda W, V, _: householder_apply_(W, V, side=case.side, transpose=t, backend=backend)
        return lambda W, V, _: householder_apply(W, V, side=case.side, transpose=t, backend=backend)

    return make


_AUTOGRAD_OPS = ("fwd", "bwd_V", "bwd_VW")
_FP32 = (torch.float32,)


def providers(device: torch.device, *, include_interpreted_triton: bool = False) -> list[Provider]:
    """Every competitor, and every backend of ours that runs on ``device`` (Triton on the CPU runs
    in the interpreter: its timings mean nothing, so it is left out unless asked for)."""
    found = [
        Provider("dense", "mose_kernels.reference: dense Q (n x n, one rank-1 update per reflector), "
                 "then matmul", _AUTOGRAD_OPS, _reference(reference.householder_apply_dense), _dense_estimate),
        Provider("peft_hra", "PEFT HRA-style: normalised vectors, n x n Q built every call, then "
                 "matmul (re-implemented; peft not required)", _AUTOGRAD_OPS, _peft_hra, _dense_estimate),
        Provider("sequential", "mose_kernels.reference: one reflector at a time (GEMV + rank-1 "
                 "update per reflector)", _AUTOGRAD_OPS,
                 _reference(reference.householder_apply_sequential), _sequential_estimate),
        Provider("torch_wy", "mose_kernels.reference: compact WY with two torch GEMMs (reads W "
                 "twice), autograd through torch ops", ("wy_factor", *_AUTOGRAD_OPS),
                 _reference(reference.householder_apply_wy), _wy_estimate),
        Provider("lapack_orgqr", "torch.linalg.householder_product (xORGQR, n x n Q) then matmul; "
                 "vectors in LAPACK storage (bench/lapack.py, converted outside the timing)", ("fwd",),
                 _lapack_orgqr, _orgqr_estimate, dtypes=_FP32, needs_lapack=True),
        Provider("lapack_ormqr", "torch.ormqr (xORMQR: blocked WY apply, no n x n), LAPACK storage "
                 "converted outside the timing", ("fwd",), _lapack_ormqr, _ormqr_estimate, dtypes=_FP32,
                 needs_lapack=True),
    ]
    for name in available_backends():
        if name == "triton" and device.type == "cpu" and not include_interpreted_triton:
            continue
        backend = get_backend(name)
        if device.type not in backend.devices:
            continue
        found.append(Provider(
            f"mose:{name}", f"mose_kernels backend {name!r} (householder_apply / householder_apply_)",
            ("wy_factor", "fwd", "fwd_inplace", "bwd_V", "bwd_VW"), _mose(name), _wy_estimate,
            dtypes=tuple(backend.dtypes),
        ))
    return found
