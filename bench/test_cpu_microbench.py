"""pytest-benchmark CPU microbenchmarks: every provider of :mod:`bench.registry` at the shape of the
kernel-core issue's closing note (W 4096 x 1024 fp32, k in {1, 16, 64}), forward on both sides, in
place, and the backward for V.

Run: ``python -m pytest bench --benchmark-enable --benchmark-columns=median,iqr,rounds``
(``pyproject.toml`` disables benchmarks by default: then each body runs once, as a smoke test).
"""

from __future__ import annotations

import pytest
import torch

from bench.lapack import to_lapack
from bench.registry import Case, Inputs, providers

N, M = 4096, 1024
KS = (1, 16, 64)
OPS = (("fwd", "left"), ("fwd", "right"), ("fwd_inplace", "right"), ("bwd_V", "right"))
PROVIDERS = providers(torch.device("cpu"))


def _params():
    for op, side in OPS:
        for k in KS:
            for provider in PROVIDERS:
                case = Case(op, "issue2", N, M, k, side, torch.float32)
                if provider.supports(case, torch.device("cpu")) is None:
                    yield pytest.param(case, provider, id=f"{op}-{side}-k{k}-{provider.name}")


@pytest.mark.parametrize(("case", "provider"), list(_params()))
def test_householder_apply(benchmark, case: Case, provider) -> None:
    gen = torch.Generator().manual_seed(0)
    inp = Inputs(W=torch.randn(case.w_shape, generator=gen), V=torch.randn(case.k, case.n, generator=gen))
    if provider.needs_lapack:
        A, tau = to_lapack(inp.V)
        inp.lapack = (A.float(), tau.float())
    fn = provider.fn(case)
    benchmark.extra_info.update(n=case.n, m=case.m, k=case.k, side=case.side, op=case.op)
    if case.op == "bwd_V":
        V = inp.V.clone().requires_grad_(True)
        y = fn(inp.W, V, inp)
        dy = torch.randn_like(y)
        (grad,) = benchmark(lambda: torch.autograd.grad(y, [V], dy, retain_graph=True))
        assert grad.shape == V.shape and torch.isfinite(grad).all()
        return
    out = benchmark(lambda: fn(inp.W, inp.V, inp))
    assert out.shape == case.w_shape and torch.isfinite(out).all()
