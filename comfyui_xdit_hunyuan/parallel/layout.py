"""Which image tokens each rank holds.

The token sequence (row-major over the token grid) is cut into PipeFusion patches of whole token rows
(one patch without PipeFusion); each patch into `ring` chunks; each chunk into `ulysses` pieces. Sequence-
parallel rank (r, u) holds piece (m, r, u) of every patch m it is processing. Any size works: splits are
as even as possible and never need padding.

After the Ulysses all-to-all, rank (r, u) holds chunk (m, r) for its share of the heads, pieces in ulysses
order; with several patches (PipeFusion warm-up), patch-major: chunk (0, r), chunk (1, r), ... which is
also the layout of the PipeFusion K/V buffer, so warm-up and pipelined steps agree on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


def even_split(n: int, parts: int) -> list[int]:
    """Sizes of `parts` consecutive pieces of n, as even as possible (larger pieces first)."""
    q, r = divmod(n, parts)
    return [q + (i < r) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


@dataclass(frozen=True)
class TokenLayout:
    rows: int            # token rows
    cols: int            # token columns
    patches: int = 1     # PipeFusion patches (whole token rows each)
    ring: int = 1
    ulysses: int = 1

    @cached_property
    def patch_rows(self) -> list[int]:
        return even_split(self.rows, self.patches)

    @cached_property
    def patch_row_start(self) -> list[int]:
        return offsets(self.patch_rows)

    def patch_tokens(self, m: int) -> tuple[int, int]:
        """[start, end) of patch m in the token sequence."""
        s = self.patch_row_start[m] * self.cols
        return s, s + self.patch_rows[m] * self.cols

    def patch_latent_rows(self, m: int, patch_size: int, latent_height: int) -> tuple[int, int]:
        """[start, end) latent rows of patch m (the last patch is cropped to the latent height)."""
        r0 = self.patch_row_start[m] * patch_size
        r1 = (self.patch_row_start[m] + self.patch_rows[m]) * patch_size
        return r0, min(r1, latent_height)

    @cached_property
    def _pieces(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        out = {}
        for m in range(self.patches):
            s, e = self.patch_tokens(m)
            chunks = even_split(e - s, self.ring)
            for r, (c0, cn) in enumerate(zip(offsets(chunks), chunks)):
                pieces = even_split(cn, self.ulysses)
                for u, (p0, pn) in enumerate(zip(offsets(pieces), pieces)):
                    out[m, r, u] = (s + c0 + p0, s + c0 + p0 + pn)
        return out

    def piece(self, m: int, r: int, u: int) -> tuple[int, int]:
        """[start, end) tokens of piece (patch m, ring r, ulysses u)."""
        return self._pieces[m, r, u]

    def piece_len(self, m: int, r: int, u: int) -> int:
        a, b = self._pieces[m, r, u]
        return b - a

    def ranges(self, patches: list[int], r: int, u: int) -> list[tuple[int, int]]:
        """Token ranges rank (r, u) holds while processing `patches` (in patch order)."""
        return [self.piece(m, r, u) for m in patches]

    def chunk_len(self, patches: list[int], r: int) -> int:
        """Tokens of ring chunk r over `patches` (what a rank holds after the Ulysses all-to-all)."""
        return sum(self.piece_len(m, r, u) for m in patches for u in range(self.ulysses))

    def buffer_slot(self, m: int, r: int) -> tuple[int, int]:
        """[start, end) of patch m's chunk inside ring rank r's patch-major K/V buffer."""
        start = sum(self.chunk_len([k], r) for k in range(m))
        return start, start + self.chunk_len([m], r)
