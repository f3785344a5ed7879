"""Sequence-parallel self-attention: Ulysses (all-to-all heads <-> tokens), Ring (K/V rotate, partial
results merged by log-sum-exp in float32), and USP (both: Ulysses inside, Ring across), plus the PipeFusion
K/V buffer that sits between the two (after the all-to-all, before the ring).

All tensors are head-first [B, H, L, d]. Uneven token counts are exchanged with exact split sizes.
"""
from __future__ import annotations

import torch

from ..model.attention import attention, attention_lse, merge_partial
from .layout import TokenLayout
from .mesh import Mesh


def ulysses_to_heads(x: torch.Tensor, mesh: Mesh, layout: TokenLayout, patches: list[int]) -> torch.Tensor:
    """[S, B, H, L_mine, d] (my pieces of `patches`, patch order) -> [S, B, H/U, L_chunk, d] (every
    Ulysses rank's pieces of my ring chunk for my head share, patch-major)."""
    U, r = mesh.degree("ulysses"), mesh.index("ring")
    S, B, H, L, d = x.shape
    h = H // U
    send = x.reshape(S, B, U, h, L, d).permute(2, 0, 1, 3, 4, 5).contiguous().view(-1)
    lens = [sum(layout.piece_len(m, r, i) for m in patches) for i in range(U)]
    unit = S * B * h * d
    recv = x.new_empty(unit * sum(lens))
    mesh.comm.all_to_all_single(recv, send, output_split_sizes=[unit * n for n in lens],
                                input_split_sizes=[unit * L] * U, group=mesh.groups["ulysses"])
    parts = recv.split([unit * n for n in lens])
    per_rank = [p.view(S, B, h, n, d) for p, n in zip(parts, lens)]
    if len(patches) == 1:
        return torch.cat(per_rank, dim=3)
    # reorder (rank, patch) -> (patch, rank): the patch-major layout of the K/V buffer
    split = [pr.split([layout.piece_len(m, r, i) for m in patches], dim=3) for i, pr in enumerate(per_rank)]
    return torch.cat([split[i][j] for j in range(len(patches)) for i in range(U)], dim=3)


def ulysses_to_tokens(y: torch.Tensor, mesh: Mesh, layout: TokenLayout, patches: list[int]) -> torch.Tensor:
    """Inverse of `ulysses_to_heads` for one tensor: [B, H/U, L_chunk, d] -> [B, H, L_mine, d]."""
    U, r, u = mesh.degree("ulysses"), mesh.index("ring"), mesh.index("ulysses")
    B, h, _, d = y.shape
    sizes = [layout.piece_len(m, r, i) for m in patches for i in range(U)]      # patch-major order
    pieces = y.split(sizes, dim=2)
    to_rank = [torch.cat([pieces[j * U + i] for j in range(len(patches))], dim=2) if len(patches) > 1
               else pieces[i] for i in range(U)]
    send = torch.cat([t.contiguous().view(-1) for t in to_rank])
    L = sum(layout.piece_len(m, r, u) for m in patches)
    unit = B * h * d
    recv = y.new_empty(unit * L * U)
    mesh.comm.all_to_all_single(recv, send, output_split_sizes=[unit * L] * U,
                                input_split_sizes=[t.numel() for t in to_rank], group=mesh.groups["ulysses"])
    return recv.view(U, B, h, L, d).permute(1, 0, 2, 3, 4).reshape(B, U * h, L, d)


def ring_attention(q: torch.Tensor, kv: torch.Tensor, kv_lens: list[int], mesh: Mesh, backend: str) -> torch.Tensor:
    """q [B, h, Lq, d] against the union of every ring rank's kv [2, B, h, L_r, d] (kv_lens[r'] is ring rank
    r''s length). The other ranks' blocks are gathered asynchronously while the local block is attended;
    partial results are merged by log-sum-exp in float32, in ring order, so every rank does the same math.

    (A single all-gather instead of R-1 point-to-point rotations: the same bytes, overlapped with the
    local block, and no pairwise NCCL communicators to set up lazily, which can deadlock at first use.)
    """
    R, r = mesh.degree("ring"), mesh.index("ring")
    n = max(kv_lens)
    mine = torch.nn.functional.pad(kv, (0, 0, 0, n - kv.shape[3])) if kv.shape[3] < n else kv
    blocks = [torch.empty_like(mine) for _ in range(R)]
    work = mesh.comm.all_gather(blocks, mine.contiguous(), group=mesh.groups["ring"], async_op=True)
    out, lse = merge_partial(None, None, *attention_lse(q, kv[0], kv[1], backend))
    work.wait()
    for step in range(1, R):
        src = (r - step) % R
        blk = blocks[src][:, :, :, :kv_lens[src]]
        out, lse = merge_partial(out, lse, *attention_lse(q, blk[0], blk[1], backend))
    return out.to(q.dtype)


class KVBuffer:
    """PipeFusion's per-layer K/V of the whole image (this rank's ring chunk, its head share), patch-
    major. Warm-up steps write it whole; pipelined steps overwrite one patch's slot, so the other
    patches' K/V are from the previous step (stale) or from this step (fresh) when already processed."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def update(self, key: tuple, kv: torch.Tensor, layout: TokenLayout, patches: list[int], ring_index: int):
        if len(patches) == layout.patches:
            self.buffers[key] = kv.contiguous()
        else:
            buf = self.buffers.get(key)
            if buf is None:
                raise RuntimeError("PipeFusion K/V buffer used before a warm-up step filled it "
                                   "(warmup_steps must be at least 1)")
            for m in patches:
                s, e = layout.buffer_slot(m, ring_index)
                a = layout.chunk_len([k for k in patches if k < m], ring_index)
                buf[:, :, :, s:e].copy_(kv[:, :, :, a:a + e - s])
        return self.buffers[key]

    def clear(self):
        self.buffers.clear()


class SequenceParallelAttention:
    """The self-attention strategy for ulysses x ring (either may be 1) with an optional K/V buffer.

    The runner sets `patches` (the patches whose tokens this forward holds) and `key` (which batch of
    conditioning is being run: buffers are per batch) before each forward.
    """

    def __init__(self, mesh: Mesh, layout: TokenLayout, backend: str, kv_buffer: KVBuffer | None = None):
        self.mesh, self.layout, self.backend, self.kv_buffer = mesh, layout, backend, kv_buffer
        self.patches: list[int] = list(range(layout.patches))
        self.key: object = 0

    # Called between compiled block halves, never inside a compiled region (HunyuanDiT.run_blocks), so it needs
    # no torch.compiler.disable: that decorator would import torch.compile's modules (seconds) in every worker.
    def __call__(self, q, k, v, block):
        mesh, layout = self.mesh, self.layout
        U, R, r = mesh.degree("ulysses"), mesh.degree("ring"), mesh.index("ring")
        if U > 1:
            q, k, v = ulysses_to_heads(torch.stack((q, k, v)), mesh, layout, self.patches).unbind(0)
        if self.kv_buffer is not None:
            kv = self.kv_buffer.update((self.key, block), torch.stack((k, v)), layout, self.patches, r)
            kv_patches = list(range(layout.patches))
        else:
            kv, kv_patches = None, self.patches
        if R > 1:
            if kv is None:
                kv = torch.stack((k, v))
            kv_lens = [layout.chunk_len(kv_patches, i) for i in range(R)]
            out = ring_attention(q, kv, kv_lens, mesh, self.backend)
        elif kv is not None:
            out = attention(q, kv[0], kv[1], self.backend)
        else:
            out = attention(q, k, v, self.backend)
        if U > 1:
            out = ulysses_to_tokens(out, mesh, layout, self.patches)
        return out
