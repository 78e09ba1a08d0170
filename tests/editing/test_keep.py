"""Keep subspaces: exact growth, energy-ordered compression at capacity, release, state round trip."""

import pytest
import torch

from mose_kernels.editing.keep import KeepSubspace, principal_directions


def _keys(rows: int, n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(rows, n, generator=g, dtype=torch.float64)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                                     dtype=torch.float64)


def _orthonormality_error(basis: torch.Tensor) -> float:
    return float((basis.T @ basis - torch.eye(basis.shape[1], dtype=basis.dtype)).abs().max())


@pytest.mark.parametrize("rows, n", [(100, 48), (30, 64), (1, 9)])
def test_principal_directions_span_the_top_singular_vectors(rows, n):
    """Tall and wide samples (the two Gram paths) give the SVD's top directions, orthonormal, in order."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, n, dtype=torch.float64)
    count = min(5, rows)
    dirs = principal_directions(x, count)
    vh = torch.linalg.svd(x, full_matrices=False)[2][:count]
    assert dirs.shape == (n, count) and _orthonormality_error(dirs) < 1e-10
    torch.testing.assert_close((dirs.T @ vh.T).abs(), torch.eye(count, dtype=torch.float64), rtol=0, atol=1e-8)
    assert principal_directions(x, 0).shape == (n, 0)



@pytest.mark.parametrize("rows, n", [(300, 100), (90, 250)])
def test_principal_directions_beyond_the_exact_limit_use_a_randomized_svd(rows, n):
    """Past ``exact_limit`` the top directions come from a randomized SVD of the float32 samples:
    the same subspace as the exact float64 path when the spectrum has a gap, orthonormal in float64."""
    g = torch.Generator().manual_seed(n)
    count = 6
    signal = torch.randn(rows, count, generator=g) @ torch.randn(count, n, generator=g) * 10
    x = (signal + 0.1 * torch.randn(rows, n, generator=g)).float()
    exact = principal_directions(x, count)
    fast = principal_directions(x, count, exact_limit=min(rows, n) - 1)
    assert fast.dtype == torch.float64 and fast.shape == (n, count) and _orthonormality_error(fast) < 1e-12
    # the same subspace: every exact direction lies in the fast span
    assert float((exact - fast @ (fast.T @ exact)).norm()) < 1e-4
    half = principal_directions(x.bfloat16(), count, exact_limit=min(rows, n) - 1)  # bf16 samples work too
    assert half.dtype == torch.float64 and float((exact - half @ (half.T @ exact)).norm()) < 0.05

def test_add_holds_the_keys_exactly_below_capacity():
    keep = KeepSubspace.empty(48, capacity=1.0).with_corpus(_keys(100, 48, 0), 4)
    keys = _keys(9, 48, 1, rank=5)
    grown = keep.add(keys)
    assert grown.dim == 4 + 5
    assert grown.residual_fraction(keys) < 1e-12
    assert _orthonormality_error(grown.basis) < 1e-12
    # the moment is the keys' second moment in the edit basis
    coords = keys @ grown.edits
    torch.testing.assert_close(grown.moment, coords.T @ coords)


def test_compression_keeps_the_most_energetic_directions():
    """Past capacity the edit part is the top principal subspace of every key fed so far."""
    n, room = 40, 12
    keep = KeepSubspace(torch.zeros(n, 0, dtype=torch.float64), torch.zeros(n, 0, dtype=torch.float64),
                        torch.zeros(0, 0, dtype=torch.float64), room)
    strong = _keys(6, n, 2, rank=6) * 10.0
    keep = keep.add(strong)
    fed = [strong]
    for seed in range(3, 9):  # weak keys, each batch of rank 3: 6 + 18 > 12 directions
        weak = _keys(3, n, seed, rank=3) * 0.1
        keep = keep.add(weak)
        fed.append(weak)
    assert room - room // 10 <= keep.dim <= room  # compressed below capacity (hysteresis)
    assert keep.released == 6 + 18 - keep.dim  # every direction fed and no longer held
    assert _orthonormality_error(keep.edits) < 1e-10
    # the strong keys stay protected although later, weaker keys arrived after them
    assert keep.residual_fraction(strong) < 1e-3
    # and it captures (nearly: released directions are forgotten, so incremental PCA is not exact)
    # the energy of the best subspace of that rank for all keys fed, not merely that of the latest ones
    everything = torch.cat(fed)
    _, _, vh = torch.linalg.svd(everything, full_matrices=False)
    best = vh[: keep.dim].T
    captured = torch.linalg.matrix_norm(everything @ keep.edits) ** 2
    optimum = torch.linalg.matrix_norm(everything @ best) ** 2
    assert float(captured / optimum) > 1 - 1e-6


def test_remove_last_inverts_add():
    keep = KeepSubspace.empty(32, capacity=1.0).add(_keys(5, 32, 4, rank=4))
    keys = _keys(4, 32, 5, rank=3)
    grown = keep.add(keys)
    back = grown.remove_last(grown.edits.shape[1] - keep.edits.shape[1], keys)
    torch.testing.assert_close(back.edits, keep.edits)
    torch.testing.assert_close(back.moment, keep.moment, atol=1e-10, rtol=0)


def test_state_round_trip_and_legacy_energy_form():
    keep = KeepSubspace.empty(24, capacity=0.5).with_corpus(_keys(50, 24, 6), 2).add(_keys(3, 24, 7))
    again = KeepSubspace.from_state(keep.state_dict(), keep.max_dim, keep.tol)
    for a, b in zip(keep.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    legacy = {"corpus": keep.corpus, "edits": keep.edits, "energy": torch.tensor([3.0, 2.0, 1.0])}
    old = KeepSubspace.from_state(legacy, keep.max_dim, keep.tol)
    torch.testing.assert_close(old.moment, torch.diag(torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64)))
    assert old.released == 0  # written before the count existed
    full = KeepSubspace.empty(24, max_dim=4).add(_keys(6, 24, 10))
    assert full.released > 0
    assert KeepSubspace.from_state(full.state_dict(), full.max_dim, full.tol).released == full.released


def test_with_corpus_reprojects_edit_keys():
    keys = _keys(4, 30, 8, rank=4)
    keep = KeepSubspace.empty(30, capacity=1.0).add(keys).with_corpus(_keys(60, 30, 9), 5)
    assert keep.corpus.shape[1] == 5
    assert keep.residual_fraction(keys) < 1e-10
    assert _orthonormality_error(keep.basis) < 1e-10
