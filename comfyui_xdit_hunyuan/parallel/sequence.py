"""Sequence-parallel self-attention: Ulysses (all-to-all heads <-> tokens), Ring (K/V rotate, partial
results merged by log-sum-exp in float32), and USP (both: Ulysses inside, Ring across), plus the PipeFusion
K/V buffer that sits between the two (after the all-to-all, before the ring).

All tensors are head-first [B, H, L, d]. Uneven token counts are exchanged with exact split sizes.

With the fused kernels (model/kernels.py) the blocks hand the attention their fused QKV projection
(`SequenceParallelAttention.attend_projection`): Ulysses exchanges the projection itself, sequence-first,
and the kernels then normalise, rotate and pad q, k, v of this rank's heads over the whole chunk, written
token-major as on one GPU (q/k norms act per head and RoPE per token, so the exchange commutes with them).
The output comes back token-major, the padding left behind, for the output projection to read as it is.
"""
from __future__ import annotations

import torch

from ..model.attention import attention, attention_lse, merge_partial, pads_head_dim
from ..model.kernels import padded_head_dim
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


def ulysses_projection_to_heads(y: torch.Tensor, mesh: Mesh, layout: TokenLayout, patches: list[int]) -> torch.Tensor:
    """The fused QKV projection of my pieces, [B, L_mine, 3*H*d] (q, k, v columns in turn) -> my head share
    of the projection of every Ulysses rank's pieces of my ring chunk, sequence-first [L_chunk, B, 3*(H/U)*d]
    (patch-major): what `norm_rope_pad(..., seq_first=True)` reads, with no copy after the exchange for one
    patch. Each rank's payload is [L, B, 3, H/U, d] (tokens outermost), so the payloads received line up
    along the tokens.

    Example, U = 2, H = 16, d = 88, 2048 tokens each: I send [2048, B, 3, 8, 88] of heads 0-7 to rank 0 and
    of heads 8-15 to rank 1; rank 0 receives [4096, B, 3 * 8 * 88]: its heads of all 4096 tokens."""
    U, r = mesh.degree("ulysses"), mesh.index("ring")
    B, L, width = y.shape
    w = width // U                                           # 3 * (H/U) * d columns per rank
    send = y.view(B, L, 3, U, w // 3).permute(3, 1, 0, 2, 4).contiguous().view(-1)
    lens = [sum(layout.piece_len(m, r, i) for m in patches) for i in range(U)]
    unit = B * w
    recv = y.new_empty(unit * sum(lens))
    mesh.comm.all_to_all_single(recv, send, output_split_sizes=[unit * n for n in lens],
                                input_split_sizes=[unit * L] * U, group=mesh.groups["ulysses"])
    out = recv.view(sum(lens), B, w)
    if len(patches) == 1:
        return out
    # reorder (rank, patch) -> (patch, rank): the patch-major layout of the K/V buffer
    split = [pr.split([layout.piece_len(m, r, i) for m in patches]) for i, pr in enumerate(out.split(lens))]
    return torch.cat([split[i][j] for j in range(len(patches)) for i in range(U)])


def ulysses_to_tokens(y: torch.Tensor, mesh: Mesh, layout: TokenLayout, patches: list[int],
                      head_dim: int | None = None) -> torch.Tensor:
    """Inverse of `ulysses_to_heads` / `ulysses_projection_to_heads` for the attention output:
    [B, H/U, L_chunk, d'] (patch-major tokens, any strides) -> [B, H, L_mine, d] head-first over token-major
    storage, which the output projection reads without a copy. head_dim: the heads' own size when d' is the
    padded one (the padding is not sent). Each rank's payload is [L, B, H/U, d]: one copy on the way out
    (none if the output is already laid out so), one on the way in."""
    U, r, u = mesh.degree("ulysses"), mesh.index("ring"), mesh.index("ulysses")
    B, h, _, dp = y.shape
    d = head_dim or dp
    s = y[..., :d].permute(2, 0, 1, 3)                                   # [L_chunk, B, h, d]
    if len(patches) > 1:                                                 # patch-major -> rank-major
        pieces = s.split([layout.piece_len(m, r, i) for m in patches for i in range(U)])
        s = torch.cat([pieces[j * U + i] for i in range(U) for j in range(len(patches))])
    send = s.contiguous().view(-1)
    L = sum(layout.piece_len(m, r, u) for m in patches)
    unit = B * h * d
    recv = y.new_empty(unit * L * U)
    mesh.comm.all_to_all_single(recv, send, output_split_sizes=[unit * L] * U,
                                input_split_sizes=[unit * sum(layout.piece_len(m, r, i) for m in patches)
                                                   for i in range(U)], group=mesh.groups["ulysses"])
    return recv.view(U, L, B, h, d).permute(2, 1, 0, 3, 4).reshape(B, L, U * h, d).transpose(1, 2)


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

    The runner sets `patches` (the patches whose tokens this forward holds), `chunk_rope` (the RoPE rows of
    the tokens this rank holds after the Ulysses exchange, `View.chunk_rope`) and `key` (which batch of
    conditioning is being run: buffers are per batch) before each forward.
    """

    def __init__(self, mesh: Mesh, layout: TokenLayout, backend: str, kv_buffer: KVBuffer | None = None):
        self.mesh, self.layout, self.backend, self.kv_buffer = mesh, layout, backend, kv_buffer
        self.patches: list[int] = list(range(layout.patches))
        self.chunk_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key: object = 0

    # Both entries are called between compiled block halves, never inside a compiled region
    # (HunyuanDiT.run_blocks), so they need no torch.compiler.disable: that decorator would import
    # torch.compile's modules (seconds) in every worker at start-up.
    def __call__(self, q, k, v, block):
        mesh, layout = self.mesh, self.layout
        U = mesh.degree("ulysses")
        if U > 1:
            q, k, v = ulysses_to_heads(torch.stack((q, k, v)), mesh, layout, self.patches).unbind(0)
        out = self._attend(q, k, v, block)
        if U > 1:
            out = ulysses_to_tokens(out, mesh, layout, self.patches)
        return out

    def attend_projection(self, y, layer, block):
        """Self-attention from the block's fused QKV projection y [B, L_mine, 3*H*d] (`layer`: its
        SelfAttentionLayer, whose fused kernels prepare q, k, v): with Ulysses the projection is exchanged
        and the kernels run on this rank's heads over its chunk, else on its own tokens; the head dim padded
        where the backend wants it. Returns [B, H, L_mine, d'] head-first (Ulysses: token-major, unpadded)."""
        U, d = self.mesh.degree("ulysses"), layer.head_dim
        pad_to = padded_head_dim(d) if pads_head_dim(self.backend) else d
        if U > 1:
            src = ulysses_projection_to_heads(y, self.mesh, self.layout, self.patches)
            q, k, v = layer.qkv_from(src, self.chunk_rope, pad_to, heads=layer.heads // U, seq_first=True)
        else:
            q, k, v = layer.qkv_from(y, self.chunk_rope, pad_to)
        out = self._attend(q, k, v, block)
        if U > 1:
            out = ulysses_to_tokens(out, self.mesh, self.layout, self.patches, head_dim=d)
        return out

    def _attend(self, q, k, v, block):
        """Attention of my queries over my ring chunk's keys (after any exchange): through the K/V buffer
        (PipeFusion), around the ring, or local."""
        mesh, layout = self.mesh, self.layout
        R, r = mesh.degree("ring"), mesh.index("ring")
        if self.kv_buffer is not None:
            kv = self.kv_buffer.update((self.key, block), torch.stack((k, v)), layout, self.patches, r)
            kv_patches = list(range(layout.patches))
        else:
            kv, kv_patches = None, self.patches
        if R > 1:
            if kv is None:
                kv = torch.stack((k, v))
            kv_lens = [layout.chunk_len(kv_patches, i) for i in range(R)]
            return ring_attention(q, kv, kv_lens, mesh, self.backend)
        if kv is not None:
            return attention(q, kv[0], kv[1], self.backend)
        return attention(q, k, v, self.backend)
