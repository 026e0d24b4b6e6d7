"""Temporal cross attention (TCA): EVL's learned readout of frame-to-frame attention maps.

For patch p of frame t, TCA adds
    sum_k A_prev(t)[p, k] * W_prev[rel(p, k)] + sum_k A_next(t)[p, k] * W_next[rel(p, k)]
where A are the head-averaged patch-to-patch attention maps between neighbouring frames and
rel(p, k) indexes the 2-D offset between patches p and k in a table of (2h-1)(2w-1) rows.

The obvious implementation gathers W[rel] into a (P, P, C) tensor (1.36 GB per weight for
L/14@336). Here, because k -> rel(p, k) is injective for a fixed p, the (P, P) map is instead
scattered into relative-offset bins (P, (2h-1)(2w-1)) and multiplied by W once: a single dense
matmul whose largest intermediate is the map itself times about 4, never times C.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_index(h: int, w: int) -> Tensor:
    """rel(p, k) for a h x w patch grid as a (P, P) int64 tensor, row-major patches."""
    rows = torch.arange(h).repeat_interleave(w)  # (P,)
    cols = torch.arange(w).repeat(h)
    dr = rows[:, None] - rows[None, :] + (h - 1)
    dc = cols[:, None] - cols[None, :] + (w - 1)
    return dr * (2 * w - 1) + dc


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half types (numerically safe softmax/LayerNorm), else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def temporal_attention_maps(q: Tensor, k: Tensor) -> Tensor:
    """Head-averaged patch attention between neighbouring frames, at least float32.

    q, k: (..., T, L, H, D) raw projections (bias included, unscaled), CLS at token 0.
    Returns (..., 2, T-1, P, P): [0, j] = A_prev of frame j+1 (q_{j+1} against k_j),
    [1, j] = A_next of frame j (q_j against k_{j+1}); rows are query patches, columns key patches.
    """
    qp = q[..., 1:, :, :].to(compute_dtype(q))
    kp = k[..., 1:, :, :].to(compute_dtype(k))
    scale = 1.0 / math.sqrt(q.shape[-1])

    def maps(qq: Tensor, kk: Tensor) -> Tensor:
        logits = torch.einsum("...phd,...khd->...hpk", qq, kk) * scale
        return logits.softmax(dim=-1).mean(dim=-3)

    prev = maps(qp[..., 1:, :, :, :], kp[..., :-1, :, :, :])
    nxt = maps(qp[..., :-1, :, :, :], kp[..., 1:, :, :, :])
    return torch.stack([prev, nxt], dim=-4)


class TemporalCrossAttention(nn.Module):
    """TCA for one decoder layer: (B, 2, T-1, P, P) maps -> (B, T, L, C) additive term, CLS rows 0."""

    def __init__(self, grid: tuple[int, int], width: int, method: str = "auto") -> None:
        super().__init__()
        if method not in ("auto", "binned", "direct"):
            raise ValueError(f"TCA method must be auto, binned or direct, not {method!r}")
        self.method = method  # auto: direct for small grids (DIRECT_TABLE_BYTES), else binned
        h, w = grid
        self.grid = (h, w)
        self.num_offsets = (2 * h - 1) * (2 * w - 1)
        # Zero init: TCA contributes nothing until trained (as in the reference).
        self.w_prev = nn.Parameter(torch.zeros(self.num_offsets, width))
        self.w_next = nn.Parameter(torch.zeros(self.num_offsets, width))
        # Derived from the grid, so not saved in checkpoints.
        self.register_buffer("rel_index", relative_index(h, w), persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        small = gathers_directly(self.grid, self.w_prev.shape[1], self.w_prev.element_size())
        if self.method == "direct" or (self.method == "auto" and small):
            return _direct(maps, self.w_prev, self.w_next, self.rel_index)
        return _BinnedTCA.apply(maps, self.w_prev, self.w_next, self.rel_index)


# Small grids (the 8x8 demo backbone: a 2 MB table) gather W[rel] as (P, P, C) and do P*P*C
# multiply-adds per frame instead of binning's P*(2h-1)(2w-1)*C (3.5x more): 1.4x faster per layer
# on CPU (`benchmarks/bench_tca.py --shapes tiny@64 --batch 32 --threads 2`). Large grids
# (14x14 x 768: 118 MB) keep the binned form.
DIRECT_TABLE_BYTES = 8 << 20


def gathers_directly(grid: tuple[int, int], width: int, element_size: int = 4) -> bool:
    """Whether `method="auto"` gathers W[rel] as (P, P, C) for this grid and width (else it bins)."""
    P = grid[0] * grid[1]
    return P * P * width * element_size <= DIRECT_TABLE_BYTES


CHUNK_BYTES = 64 << 20  # bound on one chunk of binned maps (forward and backward)


def _chunks(B: int, Tm1: int, row_bytes: int):
    """(batch slice, frame slice) blocks whose binned maps stay under CHUNK_BYTES."""
    per_b = Tm1 * row_bytes
    if per_b <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // per_b)
        for b0 in range(0, B, step):
            yield slice(b0, min(B, b0 + step)), slice(0, Tm1)
    else:
        step = max(1, CHUNK_BYTES // row_bytes)
        for b in range(B):
            for t0 in range(0, Tm1, step):
                yield slice(b, b + 1), slice(t0, min(Tm1, t0 + step))


class _BinnedTCA(torch.autograd.Function):
    """TCA as binned-maps @ W, chunked, saving only the (possibly fp16) input maps for backward.

    Autograd through `bin_relative(maps) @ W` would keep the binned tensor (about 4x the maps,
    (2h-1)(2w-1) bins per query patch) alive until backward; here it is rebuilt chunk by chunk
    in backward instead (a cheap scatter), so training memory stays ~ the maps themselves.
    """

    @staticmethod
    def forward(ctx, maps: Tensor, w_prev: Tensor, w_next: Tensor, rel_index: Tensor) -> Tensor:
        B, _, Tm1, P, _ = maps.shape
        R, C = w_prev.shape
        ctx.save_for_backward(maps, w_prev, w_next, rel_index)
        out = None
        for d, w in enumerate((w_prev, w_next)):
            for bs, ts in _chunks(B, Tm1, P * R * w.element_size()):
                part = bin_relative(maps[bs, d, ts].to(w.dtype), rel_index, R) @ w
                if out is None:  # dtype follows the matmul (autocast may make it half)
                    out = part.new_zeros(B, Tm1 + 1, 1 + P, C)
                # prev term lands on frames 1..T-1, next term on frames 0..T-2; CLS row stays 0
                shift = 1 if d == 0 else 0
                out[bs, ts.start + shift : ts.stop + shift, 1:] += part.to(out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        maps, w_prev, w_next, rel_index = ctx.saved_tensors
        B, _, Tm1, P, _ = maps.shape
        R = w_prev.shape[0]
        grads = [None, None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = torch.zeros_like(maps)
        for d, w in enumerate((w_prev, w_next)):
            if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1 + d]):
                continue
            gw = torch.zeros_like(w) if ctx.needs_input_grad[1 + d] else None
            shift = 1 if d == 0 else 0
            for bs, ts in _chunks(B, Tm1, P * R * w.element_size()):
                g = grad_out[bs, ts.start + shift : ts.stop + shift, 1:].to(w.dtype)  # (b, t, P, C)
                if gw is not None:
                    binned = bin_relative(maps[bs, d, ts].to(w.dtype), rel_index, R)
                    gw += binned.reshape(-1, R).T @ g.reshape(-1, g.shape[-1])
                if grads[0] is not None:
                    gb = g @ w.T  # (b, t, P, R): d out / d binned, then un-bin by gathering
                    grads[0][bs, d, ts] = gb.gather(-1, rel_index.expand(gb.shape[:-1] + (P,))).to(maps.dtype)
            grads[1 + d] = gw
        return tuple(grads)


def bin_relative(maps: Tensor, rel_index: Tensor, num_offsets: int) -> Tensor:
    """Scatter (..., P, P) maps into (..., P, R) relative-offset bins: out[p, rel(p, k)] += A[p, k]."""
    out = maps.new_zeros(*maps.shape[:-1], num_offsets)
    index = rel_index.expand(maps.shape)
    return out.scatter_add_(-1, index, maps)


def combine_frames(prev: Tensor, nxt: Tensor) -> Tensor:
    """(B, T-1, P, C) prev/next terms -> (B, T, 1+P, C): frame 0 has no prev, frame T-1 no next, CLS 0."""
    B, Tm1, P, C = prev.shape
    out = prev.new_zeros(B, Tm1 + 1, 1 + P, C)  # in-place adds into one buffer: no padded copies
    out[:, 1:, 1:] += prev
    out[:, :-1, 1:] += nxt
    return out


def tca_direct(maps: Tensor, w_prev: Tensor, w_next: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reference formulation (tests and benchmark only): gathers W[rel] as (P, P, C), then einsum.

    Same inputs/outputs as `TemporalCrossAttention.forward`; memory grows as P * P * C.
    """
    return _direct(maps, w_prev, w_next, relative_index(*grid).to(maps.device))


def _direct(maps: Tensor, w_prev: Tensor, w_next: Tensor, rel: Tensor) -> Tensor:
    maps = maps.to(w_prev.dtype)
    prev = torch.einsum("btpk,pkc->btpc", maps[:, 0], w_prev[rel])
    nxt = torch.einsum("btpk,pkc->btpc", maps[:, 1], w_next[rel])
    return combine_frames(prev, nxt)
