"""The two ways a rank takes its part in one model evaluation (the step strategies of parallel/runner.py),
and the pieces they share.

- `WholeModelStep`: one stage holds every block (serial, CFG parallel, Ulysses / Ring / USP). The model part
  of an evaluation is one function of the scaled latent, the timestep and the text, which the runtime's
  CUDA graphs record and replay (`GraphCache`; the text enters as per-job inputs, see `FlatTexts`).
- `PipeFusionStep`: one PipeFusion stage. It receives its input (stage 0: the latent rows of the view,
  from the last stage; the others: hidden states from the stage before) and the skip activations it
  consumes, runs its block range per call group, and sends hidden states and skips on; the last stage
  runs the final layer.
Both hand the final-layer tokens of the whole view (gathered over the sequence-parallel group) to the
runner on the ranks that predict; the runner does the rest (v-prediction to denoised, guidance, samplers)
the same way for both.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..model import HunyuanDiT
from ..model.config import HunyuanDiTConfig
from ..model.hunyuandit import TextConditions
from ..plan import ParallelConfig
from .graphs import GraphCache
from .layout import TokenLayout, even_split, offsets
from .mesh import Mesh

if TYPE_CHECKING:
    from .runner import JobState, View


class Step:
    """What depends on how the model is split. Per evaluation e the runner calls `begin(st, e)`, then
    `tokens(st, e, view)` for each view, and `hand_off(st, e, m)` for each patch m whose next input is
    ready; cancelled before evaluation e, it calls `drain(st, e)`. Only `tokens` is required."""

    def begin(self, st: JobState, e: int) -> None:
        """Before the views of evaluation e."""

    def tokens(self, st: JobState, e: int, view: View) -> torch.Tensor | None:
        """Final-layer tokens of the whole view on the ranks that predict; None on the others."""
        raise NotImplementedError

    def hand_off(self, st: JobState, e: int, m: int) -> None:
        """Patch m's next model input (st.inputs[m]) is ready, after evaluation e."""

    def drain(self, st: JobState, e: int) -> None:
        """The job stops before evaluation e: take in what other ranks already sent for it."""


# ---------------------------------------------------------------------------------------------------------
# (a) the whole model per evaluation
@dataclass
class GraphedCall:
    """The whole model call as the GraphCache runs it: built once per job (one stage has one view)."""
    key: tuple                          # fixes the recorded work (with the inputs' signatures)
    fn: Callable                        # fn(xin, t, *job_inputs) -> final-layer tokens
    job_inputs: list[torch.Tensor]      # FlatTexts.flatten of the call groups' texts


class WholeModelStep(Step):
    """One stage with every block: serial, CFG parallel (one side per rank), Ulysses / Ring / USP (this
    rank's token pieces, the view's tokens gathered at the end). Through a CUDA graph when the runtime keeps
    graphs (and, for Ulysses / Ring, records their collectives): the same function on fixed buffers, whose
    inputs are the scaled latent and the timestep (per step) and each group's pooled text vector and text
    K/V (per job). A graphed result is valid until the next evaluation."""

    def __init__(self, model: HunyuanDiT, mesh: Mesh, plan: ParallelConfig, graphs: GraphCache | None):
        self.model, self.mesh, self.plan = model, mesh, plan
        self.blocks = range(model.cfg.depth)
        self.communicates = mesh.sp_degree > 1
        self.graphs = graphs if graphs is not None and (graphs.collectives or not self.communicates) else None

    def tokens(self, st: JobState, e: int, view: View) -> torch.Tensor:
        # one stage has one patch: its model input is the whole latent's
        rows = padded_rows(st.inputs[0], *view.rows, self.model.cfg.patch_size)
        xin = st.ms.calculate_input(torch.tensor(st.evals[e][0]), rows)
        t = st.timesteps[e:e + 1]
        if self.graphs is None:
            return self._forward(xin, t, [g.text for g in st.groups], st.attn, st.batches, st.layout, view)
        if st.graphed is None:
            st.graphed = self._graphed(st, view)
        call = st.graphed
        return self.graphs(call.key, call.fn, [xin, t], call.job_inputs, job=st.token,
                           keep=(*view.rope, *view.chunk_rope), communicates=self.communicates)

    def _forward(self, xin, t, texts: list[TextConditions], attn, batches: list[int], layout: TokenLayout,
                 view: View) -> torch.Tensor:
        """Final-layer tokens of every call group for the whole latent (the function the graphs record)."""
        model, B = self.model, xin.shape[0]
        tok = model.embed_image(xin)
        if self.communicates:
            tok = torch.cat([tok[:, a:b] for a, b in view.ranges], dim=1)
        outs = []
        for gi, (text, n) in enumerate(zip(texts, batches)):
            attn.key = gi
            cond = model.conditions(text, t)
            o = model.run_blocks(tok.repeat(n // B, 1, 1), cond, view.rope, self.blocks, {}, attn)
            outs.append(model.final_tokens(o, cond))
        return gather_sp(torch.cat(outs), self.mesh, layout, view)

    def _graphed(self, st: JobState, view: View) -> GraphedCall:
        """`_forward` of this job's one view on the GraphCache's buffers: the texts come in flat."""
        texts = FlatTexts(len(st.groups), self.model.cfg.depth)
        attn, batches, layout = st.attn, st.batches, st.layout

        def fn(xin, t, *flat):
            return self._forward(xin, t, texts.unflatten(flat), attn, batches, layout, view)

        key = ("whole", tuple(batches), attn.backend, self.model.options.cross_attention, tuple(self.blocks),
               tuple(self.plan.mesh_degrees.items()), self.mesh.rank, tuple(view.ranges))
        return GraphedCall(key, fn, texts.flatten([g.text for g in st.groups]))


@dataclass(frozen=True)
class FlatTexts:
    """The texts of `groups` call groups as one flat tensor list (the GraphCache's per-job inputs) and
    back. Per group, in group order: the pooled vector `extra`, then (k, v) of every block in block order.

    Example, two groups of a depth-2 model: flatten gives
    [extra_0, k_0^0, v_0^0, k_0^1, v_0^1, extra_1, k_1^0, v_1^0, k_1^1, v_1^1], and unflatten of that list
    gives two TextConditions with those extra and text_kv (no text tokens: the K/V are filled)."""
    groups: int
    depth: int

    def flatten(self, texts: list[TextConditions]) -> list[torch.Tensor]:
        return [x for text in texts for x in (text.extra, *(t for kv in text.text_kv for t in kv))]

    def unflatten(self, flat) -> list[TextConditions]:
        n = 1 + 2 * self.depth
        return [self._text(flat[i * n:(i + 1) * n]) for i in range(self.groups)]

    @staticmethod
    def _text(part) -> TextConditions:
        extra, *kv = part
        return TextConditions(text=None, extra=extra, text_kv=list(zip(kv[0::2], kv[1::2])))


# ---------------------------------------------------------------------------------------------------------
# (b) a PipeFusion stage
def stage_blocks(depth: int, stages: int) -> list[range]:
    """Contiguous block ranges of each pipeline stage (as even as possible, earlier stages larger)."""
    sizes = even_split(depth, stages)
    return [range(o, o + n) for o, n in zip(offsets(sizes), sizes)]


def skip_routes(cfg: HunyuanDiTConfig, stages: list[range], stage: int) -> tuple[dict, dict]:
    """The skip activations that cross stages, routed by block index (so any stage split works):
    (to, from), to[s] = my blocks whose skip output stage s consumes, from[s] = the blocks of stage s whose
    skip output I consume; both ascending, as both ends order a message by producer block.

    Example, depth 8 (block i > 4 takes the skip of block 7 - i) in stages [0, 1, 2], [3, 4, 5], [6, 7]:
    stage 0: to {1: [2], 2: [0, 1]}, from {}; stage 1: to {}, from {0: [2]}; stage 2: to {}, from {0: [0, 1]}.
    """
    stage_of = {b: s for s, rng in enumerate(stages) for b in rng}
    to: dict[int, list[int]] = {}
    frm: dict[int, list[int]] = {}
    for b in stages[stage]:
        if cfg.is_skip_source(b) and stage_of[cfg.depth - 1 - b] != stage:
            to.setdefault(stage_of[cfg.depth - 1 - b], []).append(b)
        src = cfg.skip_source(b)
        if src is not None and stage_of[src] != stage:
            frm.setdefault(stage_of[src], []).append(src)
    for blocks in (*to.values(), *frm.values()):
        blocks.sort()
    return to, frm


class PipeFusionStep(Step):
    """One PipeFusion stage: receive / run my blocks / send, per view. The last stage predicts and sends
    each patch's next input to stage 0 (`hand_off`); the first inputs go after the first cancel agreement,
    so that stage 0 is not inside that agreement while NCCL sets up this pair's communicator (both must
    join it)."""

    def __init__(self, model: HunyuanDiT, mesh: Mesh, stages: list[range]):
        self.model, self.mesh = model, mesh
        self.stages, self.stage = len(stages), mesh.index("pp")
        self.blocks = stages[self.stage]
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        to, frm = skip_routes(model.cfg, stages, self.stage)
        self.skip_to, self.skip_from = sorted(to.items()), sorted(frm.items())

    def begin(self, st: JobState, e: int) -> None:
        if e == 0 and self.last:
            for m in range(st.layout.patches):
                st.links.send(0, st.inputs[m], 0, "latent")
        st.conds = [self.model.conditions(g.text, st.timesteps[e:e + 1]) for g in st.groups]

    def tokens(self, st: JobState, e: int, view: View) -> torch.Tensor | None:
        hidden = self._stage_input(st, e, view)
        skips_in = self._received_skips(st, view)
        outs, produced = [], []
        for gi, (cond, part) in enumerate(zip(st.conds, hidden.split(st.batches))):
            st.attn.key = gi
            o = sum(st.batches[:gi])
            skips = {blk: s[o:o + st.batches[gi]] for blk, s in skips_in.items()}
            outs.append(self.model.run_blocks(part, cond, view.rope, self.blocks, skips, st.attn))
            produced.append(skips)
        for dst, blks in self.skip_to:
            st.links.send(e, torch.stack([torch.cat([s[b] for s in produced]) for b in blks]), dst, "skip")
        if not self.last:
            st.links.send(e, torch.cat(outs), self.stage + 1, "hidden")
            return None
        out_tok = torch.cat([self.model.final_tokens(o, c) for o, c in zip(outs, st.conds)])
        return gather_sp(out_tok, self.mesh, st.layout, view)

    def hand_off(self, st: JobState, e: int, m: int) -> None:
        st.links.send(e, st.inputs[m], 0, "latent")

    def drain(self, st: JobState, e: int) -> None:
        """Stage 0 receives the patch inputs the last stage sent for evaluation e (none before the first)."""
        if self.first and e > 0:
            for a, b in st.patch_rows:
                st.links.recv(st.x_cur[:, :, a:b].shape, torch.float32, self.stages - 1, "latent")

    def _stage_input(self, st: JobState, e: int, view: View) -> torch.Tensor:
        """Hidden states of my token pieces of the view, for every call group (stacked in group order)."""
        model = self.model
        if not self.first:
            shape = (sum(st.batches), view.held, model.cfg.hidden_size)
            return st.links.recv(shape, model.dtype, self.stage - 1, "hidden")
        for m in view.patches:
            a, b = st.patch_rows[m]
            st.x_cur[:, :, a:b] = st.links.recv(st.x_cur[:, :, a:b].shape, torch.float32, self.stages - 1, "latent")
        rows = padded_rows(st.x_cur, *view.rows, model.cfg.patch_size)
        tok = model.embed_image(st.ms.calculate_input(torch.tensor(st.evals[e][0]), rows))
        v0 = st.layout.patch_tokens(view.patches[0])[0]
        tok = torch.cat([tok[:, a - v0:b - v0] for a, b in view.ranges], dim=1)
        return torch.cat([tok.repeat(n // st.shape[0], 1, 1) for n in st.batches])

    def _received_skips(self, st: JobState, view: View) -> dict[int, torch.Tensor]:
        """The skip activations of earlier stages that my blocks consume, by producer block."""
        skips = {}
        for src, blks in self.skip_from:
            shape = (len(blks), sum(st.batches), view.held, self.model.cfg.hidden_size)
            skips.update(zip(blks, st.links.recv(shape, self.model.dtype, src, "skip").unbind(0)))
        return skips


class StageLinks:
    """One job's PipeFusion messages between this rank and the other stages of its pipeline (the ranks of
    equal cfg / ring / ulysses coordinates), one process group per flow. Sends are asynchronous: each is kept
    alive until complete, and settled a couple of evaluations later."""

    def __init__(self, mesh: Mesh, device: torch.device):
        self.mesh, self.device = mesh, device
        self.pending: deque = deque()                 # (evaluation, work) of outstanding sends

    def recv(self, shape, dtype, src_stage: int, flow: str) -> torch.Tensor:
        buf = torch.empty(shape, device=self.device, dtype=dtype)
        self.mesh.comm.irecv(buf, self.mesh.rank_at(pp=src_stage), group=self.mesh.p2p[flow]).wait()
        return buf

    def send(self, ev: int, t: torch.Tensor, dst_stage: int, flow: str) -> None:
        work = self.mesh.comm.isend(t.contiguous(), self.mesh.rank_at(pp=dst_stage), group=self.mesh.p2p[flow])
        self.pending.append((ev, work))

    def settle(self, before: int | None = None) -> None:
        """Wait for the sends of evaluations before `before` (all when None)."""
        while self.pending and (before is None or self.pending[0][0] < before):
            self.pending.popleft()[1].wait()


# ---------------------------------------------------------------------------------------------------------
# shared by both
def gather_sp(tok: torch.Tensor, mesh: Mesh, layout: TokenLayout, view: View) -> torch.Tensor:
    """Final-layer tokens of my pieces -> tokens of the whole view, on every rank of the SP group."""
    if mesh.sp_degree == 1:
        return tok
    U, R = mesh.degree("ulysses"), mesh.degree("ring")
    lens = [sum(layout.piece_len(m, r, u) for m in view.patches) for r in range(R) for u in range(U)]
    n = max(lens)
    padded = torch.nn.functional.pad(tok, (0, 0, 0, n - tok.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in lens]
    mesh.comm.all_gather(parts, padded, group=mesh.sp_group)
    v0, v1 = layout.patch_tokens(view.patches[0])[0], layout.patch_tokens(view.patches[-1])[1]
    out = tok.new_empty(tok.shape[0], v1 - v0, tok.shape[2])
    for i, part in enumerate(parts):
        r, u = divmod(i, U)
        pos = 0
        for a, b in layout.ranges(view.patches, r, u):
            out[:, a - v0:b - v0] = part[:, pos:pos + b - a]
            pos += b - a
    return out


def padded_rows(x: torch.Tensor, r0: int, r1: int, p: int) -> torch.Tensor:
    """Latent rows r0..r1, padded to whole patches exactly as a circular pad of the whole latent would."""
    H, W = x.shape[-2:]
    rows = x[:, :, r0:r1]
    if r1 == H and H % p:
        rows = torch.cat([rows, x[:, :, : p - H % p]], dim=2)
    if W % p:
        rows = torch.cat([rows, rows[..., : p - W % p]], dim=3)
    return rows
