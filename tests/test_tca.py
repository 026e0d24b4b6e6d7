"""TCA: the relative-offset binning implementation equals the direct (P, P, C) formulation and the spec."""

import math

import pytest
import torch

from evl_cache.tca import (
    TemporalCrossAttention,
    _BinnedTCA,
    relative_index,
    tca_direct,
    temporal_attention_maps,
)


def _rand_maps(B, T, P, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 2, T - 1, P, P, generator=g, dtype=dtype).softmax(-1)


def test_relative_index_matches_formula_on_non_square_grid():
    h, w = 3, 5
    rel = relative_index(h, w)
    assert rel.shape == (h * w, h * w)
    for p in range(h * w):
        for k in range(h * w):
            rp, cp, rk, ck = divmod(p, w) + divmod(k, w)
            assert rel[p, k] == (rp - rk + h - 1) * (2 * w - 1) + (cp - ck + w - 1)
    # For a fixed query patch, every key patch lands in its own bin (why binning is exact).
    assert all(len(set(row.tolist())) == h * w for row in rel)
    assert int(rel.max()) == (2 * h - 1) * (2 * w - 1) - 1


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 4), (4, 3), (5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_efficient_equals_direct(grid, dtype):
    torch.manual_seed(0)
    B, T, C = 2, 4, 8
    P = grid[0] * grid[1]
    tca = TemporalCrossAttention(grid, C, method="binned").to(dtype)
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    maps = _rand_maps(B, T, P, dtype)
    out = tca(maps)
    ref = tca_direct(maps, tca.w_prev, tca.w_next, grid)
    assert out.shape == (B, T, 1 + P, C)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_efficient_equals_spec_loops_and_boundaries():
    """Plain loops straight from the spec: CLS rows 0, frame 0 no prev, frame T-1 no next."""
    torch.manual_seed(1)
    h, w, C, T = 2, 3, 4, 3
    P = h * w
    tca = TemporalCrossAttention((h, w), C, method="binned").double()
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    maps = _rand_maps(1, T, P)
    out = tca(maps)[0]
    ref = torch.zeros(T, 1 + P, C, dtype=torch.float64)
    for t in range(T):
        for p in range(P):
            for k in range(P):
                r = (p // w - k // w + h - 1) * (2 * w - 1) + (p % w - k % w + w - 1)
                if t > 0:
                    ref[t, 1 + p] += maps[0, 0, t - 1, p, k] * tca.w_prev[r]
                if t < T - 1:
                    ref[t, 1 + p] += maps[0, 1, t, p, k] * tca.w_next[r]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert out[:, 0].abs().max() == 0


def test_zero_init_and_gradients_match_direct():
    grid, C = (3, 2), 6
    tca = TemporalCrossAttention(grid, C, method="binned").double()
    maps = _rand_maps(2, 3, 6)
    assert tca(maps).abs().max() == 0  # zero contribution at init
    torch.manual_seed(2)
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    g_out = torch.randn(2, 3, 7, C, dtype=torch.float64)
    (tca(maps) * g_out).sum().backward()
    wp = tca.w_prev.detach().clone().requires_grad_()
    wn = tca.w_next.detach().clone().requires_grad_()
    (tca_direct(maps, wp, wn, grid) * g_out).sum().backward()
    torch.testing.assert_close(tca.w_prev.grad, wp.grad)
    torch.testing.assert_close(tca.w_next.grad, wn.grad)


def test_attention_maps_match_per_head_loop():
    torch.manual_seed(3)
    B, T, L, H, D = 2, 3, 5, 3, 4
    q = torch.randn(B, T, L, H, D, dtype=torch.float64)
    k = torch.randn(B, T, L, H, D, dtype=torch.float64)
    maps = temporal_attention_maps(q, k)
    assert maps.shape == (B, 2, T - 1, L - 1, L - 1)
    for b in range(B):
        for j in range(T - 1):
            for slot, (tq, tk) in enumerate([(j + 1, j), (j, j + 1)]):
                acc = torch.zeros(L - 1, L - 1, dtype=torch.float64)
                for hh in range(H):
                    logits = q[b, tq, 1:, hh] @ k[b, tk, 1:, hh].T / math.sqrt(D)
                    acc += torch.softmax(logits, dim=-1)
                torch.testing.assert_close(maps[b, slot, j], acc / H)
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, 2, T - 1, L - 1, dtype=torch.float64))


def test_fp16_maps_are_upcast():
    tca = TemporalCrossAttention((2, 2), 4, method="binned")
    with torch.no_grad():
        tca.w_prev.normal_()
    maps = _rand_maps(1, 2, 4, torch.float32)
    out16 = tca(maps.half())
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, tca(maps.half().float()))


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000, 1])  # one chunk; batch chunks; frame chunks
def test_chunked_forward_and_backward_equal_direct(monkeypatch, chunk_bytes):
    import evl_cache.tca as tca_mod

    monkeypatch.setattr(tca_mod, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(4)
    grid, C, B, T = (2, 3), 5, 3, 4
    tca = TemporalCrossAttention(grid, C, method="binned").double()
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    maps = _rand_maps(B, T, 6).requires_grad_()
    g = torch.randn(B, T, 7, C, dtype=torch.float64)
    (tca(maps) * g).sum().backward()
    maps2 = maps.detach().clone().requires_grad_()
    wp = tca.w_prev.detach().clone().requires_grad_()
    wn = tca.w_next.detach().clone().requires_grad_()
    out = tca_direct(maps2, wp, wn, grid)
    (out * g).sum().backward()
    torch.testing.assert_close(tca(maps), out)
    for a, b in ((maps.grad, maps2.grad), (tca.w_prev.grad, wp.grad), (tca.w_next.grad, wn.grad)):
        torch.testing.assert_close(a, b)


def test_gradcheck():
    torch.manual_seed(5)
    tca = TemporalCrossAttention((2, 2), 3).double()
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    maps = _rand_maps(2, 3, 4).requires_grad_()
    fn = lambda m, a, b: _BinnedTCA.apply(m, a, b, tca.rel_index)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (maps, tca.w_prev, tca.w_next))


@pytest.mark.parametrize("method", ["auto", "direct"])
def test_direct_path_for_small_grids_equals_binned(method):
    """`auto` picks the gathered (P, P, C) form when the table is small (the demo's 8x8 grid)."""
    torch.manual_seed(6)
    grid, C = (3, 3), 5
    fast, binned = TemporalCrossAttention(grid, C, method=method).double(), TemporalCrossAttention(grid, C, method="binned").double()
    with torch.no_grad():
        fast.w_prev.normal_()
        fast.w_next.normal_()
    binned.load_state_dict(fast.state_dict())
    maps = _rand_maps(2, 4, 9)
    g = torch.randn(2, 4, 10, C, dtype=torch.float64)
    (fast(maps) * g).sum().backward()
    (binned(maps) * g).sum().backward()
    torch.testing.assert_close(fast(maps), binned(maps), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fast.w_prev.grad, binned.w_prev.grad)
    torch.testing.assert_close(fast.w_next.grad, binned.w_next.grad)
    with pytest.raises(ValueError):
        TemporalCrossAttention(grid, C, method="fast")
