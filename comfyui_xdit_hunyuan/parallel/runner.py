"""The sampling loop every rank runs, for any mesh: serial, CFG parallel, Ulysses/Ring/USP, PipeFusion and
their products. One loop: without PipeFusion there is one stage and one patch.

Per model evaluation (a sampler step, or one of heun's two), for each view (the patches evaluated at once):
- the rank's step strategy (parallel/steps.py) runs its part of the model: the whole model
  (`WholeModelStep`), or one PipeFusion stage (`PipeFusionStep`: stage 0 embeds its token pieces of the
  latent rows; each stage runs its block range; hidden states go to the next stage, skip activations to
  the stage of the block that consumes them), and hands the final-layer tokens of the whole view to the
  ranks that predict (the last stage);
- there the runner turns the v-prediction into denoised, averages conditioning entries by strength (as
  ComfyUI), exchanges the result with its CFG partner, applies guidance and the sampler step per patch
  (samplers are elementwise); PipeFusion sends each patch's next input to stage 0.
PipeFusion pipelines patches after `warmup_steps` synchronous steps; self-attention then reads a K/V buffer
in which the patches not yet processed this step are one step stale.

Everything a job reads and writes lives in its `JobState`, built at the start of `Runner.run`, so that a
Runner may run many jobs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .. import sampling
from ..job import CondEntry, Job, JobCancelled, JobError
from ..model import HunyuanDiT, LocalAttention, TokenGrid
from ..model.hunyuandit import Conditions, TextConditions
from ..plan import ParallelConfig
from .graphs import GraphCache
from .layout import TokenLayout
from .mesh import Mesh
from .sequence import KVBuffer, SequenceParallelAttention
from .steps import GraphedCall, PipeFusionStep, StageLinks, Step, WholeModelStep, stage_blocks


@dataclass
class CallGroup:
    """Conditioning entries evaluated in one batched model call (equal shapes, as ComfyUI batches)."""
    entries: list[CondEntry]
    sides: list[int]                 # per entry: 0 = negative (uncond), 1 = positive (cond)
    text: TextConditions | None = None


def call_groups(job: Job, sides: list[int]) -> list[CallGroup]:
    """Entries of the given sides (0 negative, 1 positive), grouped by shape in order of appearance."""
    groups: dict[tuple, CallGroup] = {}
    for side in sides:
        for e in (job.negative if side == 0 else job.positive):
            g = groups.setdefault(e.shape_key(), CallGroup([], []))
            g.entries.append(e)
            g.sides.append(side)
    return list(groups.values())


def batched_kwargs(entries: list[CondEntry], batch: int) -> dict:
    """Model kwargs of several entries in one call: each repeated to the latent batch, then stacked."""
    def rep(t):
        if t.shape[0] not in (1, batch):
            raise JobError(f"a conditioning has batch {t.shape[0]} but the latent has batch {batch}; "
                           f"use conditioning of batch 1 or {batch}")
        return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t
    out = {}
    for key in ("context", "text_embedding_mask", "encoder_hidden_states_t5", "text_embedding_mask_t5",
                "image_meta_size"):
        vals = [getattr(e, key) for e in entries]
        out[key] = None if any(v is None for v in vals) else torch.cat([rep(v) for v in vals])
    return out


def side_weight(entries: list[CondEntry]) -> torch.Tensor:
    """ComfyUI's out_count of one side: 1e-37 plus the strengths of its entries (float32 arithmetic)."""
    w = torch.tensor(1e-37, dtype=torch.float32)
    for e in entries:
        w = w + torch.tensor(e.strength, dtype=torch.float32)
    return w


@dataclass(frozen=True)
class View:
    """Patches evaluated at once (all of them, or one PipeFusion patch) and this rank's share of them.

    Example, a 16x16 latent (8x8 tokens of 2x2) in 2 patches, ring 1, ulysses 2, rank u = 1: the view of
    patch 1 has rows (8, 16), token_rows (4, 8), ranges [(48, 64)] (the second half of tokens 32..64),
    held 16, and after the Ulysses exchange the chunk [(32, 48), (48, 64)]; the warm-up view [0, 1] has
    rows (0, 16), token_rows (0, 8), ranges [(16, 32), (48, 64)], chunk [(0, 16), (16, 32), (32, 48),
    (48, 64)] (patch-major)."""
    patches: list[int]
    ranges: list[tuple[int, int]]       # this rank's token ranges, in patch order
    held: int                           # tokens in them
    rows: tuple[int, int]               # latent rows
    token_rows: tuple[int, int]
    rope: tuple[torch.Tensor, torch.Tensor]        # RoPE (cos, sin) rows of this rank's tokens
    chunk: list[tuple[int, int]]        # the token ranges this rank holds after the Ulysses exchange
    chunk_rope: tuple[torch.Tensor, torch.Tensor]  # their RoPE rows (the fused kernels' there)

    @staticmethod
    def of(patches: list[int], st: JobState, ring: int, ulysses: int) -> View:
        lay = st.layout
        ranges = lay.ranges(patches, ring, ulysses)
        chunk = [lay.piece(m, ring, u) for m in patches for u in range(lay.ulysses)]
        first, last = patches[0], patches[-1]
        rope = tuple(torch.cat([tab[a:b] for a, b in ranges]) for tab in st.rope_full)
        return View(patches, ranges, sum(b - a for a, b in ranges),
                    rows=(st.patch_rows[first][0], st.patch_rows[last][1]),
                    token_rows=(lay.patch_row_start[first], lay.patch_row_start[last] + lay.patch_rows[last]),
                    rope=rope, chunk=chunk,
                    chunk_rope=rope if chunk == ranges else
                    tuple(torch.cat([tab[a:b] for a, b in chunk]) for tab in st.rope_full))


@dataclass
class JobState:
    """One job on one rank: built by `Runner._prepare`, dropped with the job."""
    job: Job
    ms: sampling.DiscreteVSampling
    sigmas: torch.Tensor                                 # float32, CPU
    shape: tuple                                         # of the latent
    grid: TokenGrid
    layout: TokenLayout
    patch_rows: list[tuple[int, int]]                    # latent rows of each patch
    rope_full: tuple[torch.Tensor, torch.Tensor]         # RoPE (cos, sin) of every token
    use_uncond: bool
    groups: list[CallGroup]                              # this rank's batched model calls, text encoded
    batches: list[int]                                   # the batch of each call
    weights: list[torch.Tensor]                          # of the sides (negative, positive): 0-dim, CPU
    attn: LocalAttention | SequenceParallelAttention     # self-attention (sequence parallel: also PipeFusion)
    kv_buffer: KVBuffer | None                           # PipeFusion's stale K/V
    evals: list[tuple[float, int]]                       # (sigma, step) of every model evaluation
    timesteps: torch.Tensor                              # of every evaluation, on the device (moved once)
    warmup: int                                          # steps evaluating all patches at once
    samplers: list[sampling.SliceSampler] | None         # last stage: one per patch
    inputs: list[torch.Tensor]                           # last stage: each patch's next model input
    x0: torch.Tensor | None                              # reporting rank: the latest denoised (previews)
    x_cur: torch.Tensor | None                           # PipeFusion stage 0: each patch's latest input
    links: StageLinks                                    # PipeFusion's messages; sends not yet settled
    views: dict[bool, list[View]] = field(default_factory=dict)     # pipelined? -> views, at first use
    conds: list[Conditions] | None = None                # PipeFusion: of the current evaluation
    graphed: GraphedCall | None = None                   # the whole model's graphed call, at first use
    token: object = field(default_factory=object)        # this job, to the GraphCache


class _Phases:
    """Host seconds of consecutive set-up phases, by name, into `seconds`."""

    def __init__(self):
        self.seconds: dict = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._t = now - self._t, now


class Runner:
    """One rank's share of a job on a mesh. The model holds this rank's weights (all blocks)."""

    def __init__(self, model: HunyuanDiT, mesh: Mesh, plan: ParallelConfig, *, backend: str = "auto",
                 report: Callable[[dict], None] | None = None,
                 cancel_requested: Callable[[], bool] | None = None, graphs: GraphCache | None = None):
        self.model, self.mesh, self.plan, self.backend = model, mesh, plan, backend
        self.report = report or (lambda msg: None)
        self.cancel_requested = cancel_requested or (lambda: False)
        self.P = mesh.degree("pp")
        self.first, self.last = mesh.index("pp") == 0, mesh.index("pp") == self.P - 1
        self.reporter = self.last and mesh.index("cfg") == 0 and mesh.sp_index == 0
        self.step: Step = (WholeModelStep(model, mesh, plan, graphs) if self.P == 1 else
                           PipeFusionStep(model, mesh, stage_blocks(model.cfg.depth, self.P)))
        self.setup_phases: dict = {}                   # host seconds of each part of the last set-up (stats)

    # ------------------------------------------------------------------ the job
    @torch.no_grad()
    def run(self, job: Job) -> torch.Tensor | None:
        """The job's final LATENT on rank 0 (CPU float32), None on the other ranks."""
        st = self._prepare(job)
        steps = len(st.sigmas) - 1
        for e, (_, step_i) in enumerate(st.evals):
            if self._agree_cancel():
                self.step.drain(st, e)
                self._release(st)
                raise JobCancelled(f"cancelled before step {step_i + 1} of {steps}")
            st.links.settle(before=e - 1)
            self.step.begin(st, e)
            for view in self._views(st, step_i):
                st.attn.patches = view.patches         # the patches whose tokens this forward holds
                st.attn.chunk_rope = view.chunk_rope
                tokens = self.step.tokens(st, e, view)
                if tokens is not None:
                    self._advance(st, e, view, tokens)
            if self.reporter and (e + 1 == len(st.evals) or st.evals[e + 1][1] != step_i):
                self._progress(st, step_i + 1, steps)
        self._release(st)
        return self._finish(st)

    # ------------------------------------------------------------------ set-up
    def _prepare(self, job: Job) -> JobState:
        """The job's state; the host time of each phase goes to `setup_phases`."""
        phases = _Phases()
        self.setup_phases = phases.seconds
        model, dev = self.model, self.model.device
        ms = sampling.DiscreteVSampling.for_model(model.cfg)
        sigmas = job.sigmas.to(torch.float32).cpu()
        x = sampling.initial_latent(ms, sigmas, job.noise.float(), job.latent.float()).to(dev, torch.float32)
        phases.mark("latent")
        B, _, H, W = x.shape
        grid = TokenGrid(H, W, model.cfg.patch_size)
        layout = TokenLayout(grid.rows, grid.cols, patches=self.plan.patches if self.P > 1 else 1,
                             ring=self.mesh.degree("ring"), ulysses=self.mesh.degree("ulysses"))
        rope_full = model.rope(grid)
        patch_rows = [layout.patch_latent_rows(m, model.cfg.patch_size, H) for m in range(layout.patches)]
        use_uncond = job.uses_uncond()
        groups = self._encoded_groups(job, use_uncond, B)
        weights = [side_weight(job.negative), side_weight(job.positive)]
        phases.mark("text")
        attn, kv_buffer = self._attention(layout, groups)
        phases.mark("attention")
        evals = list(zip(sampling.evaluation_sigmas(job.sampler, sigmas, job.sampler_options),
                         sampling.evaluation_steps(job.sampler, sigmas, job.sampler_options)))
        timesteps = ms.timestep(torch.tensor([sg for sg, _ in evals], dtype=torch.float32)).to(dev)
        phases.mark("schedule")
        samplers = self._samplers(job, sigmas, x, patch_rows) if self.last else None
        st = JobState(
            job=job, ms=ms, sigmas=sigmas, shape=tuple(x.shape), grid=grid, layout=layout, patch_rows=patch_rows,
            rope_full=rope_full, use_uncond=use_uncond, groups=groups, batches=[len(g.entries) * B for g in groups],
            weights=weights, attn=attn, kv_buffer=kv_buffer, evals=evals, timesteps=timesteps,
            warmup=self.plan.warmup_steps if self.P > 1 else len(sigmas),      # one stage: every step
            samplers=samplers, inputs=[s.next_input()[0] for s in samplers or ()],
            x0=torch.zeros_like(x) if self.reporter else None,
            x_cur=x.clone() if self.first and self.P > 1 else None, links=StageLinks(self.mesh, dev))
        phases.mark("samplers")
        return st

    def _encoded_groups(self, job: Job, use_uncond: bool, batch: int) -> list[CallGroup]:
        """This rank's call groups (with CFG parallel, its side's), their text encoded once for the job."""
        mesh = self.mesh
        if mesh.degree("cfg") == 2:
            sides = [mesh.index("cfg")] if use_uncond else [1]
        else:
            sides = [0, 1] if use_uncond else [1]
        groups = call_groups(job, sides)
        for g in groups:
            g.text = self.model.encode_text(**batched_kwargs(g.entries, batch), batch=len(g.entries) * batch)
        return groups

    def _attention(self, layout: TokenLayout, groups: list[CallGroup]):
        """(self-attention strategy, PipeFusion's K/V buffer or None) of the job. One stage: every block's
        text K/V computed now, once per job (they are inputs of the graphed call)."""
        kv_buffer = KVBuffer() if self.P > 1 else None
        if self.mesh.sp_degree == 1 and self.P == 1:
            attn = LocalAttention(self.backend)        # traceable: stays inside compiled block graphs
        else:
            attn = SequenceParallelAttention(self.mesh, layout, self.backend, kv_buffer)
        if self.P == 1:
            for g in groups:
                self.model.fill_text_kv(g.text)
        return attn, kv_buffer

    @staticmethod
    def _samplers(job: Job, sigmas, x: torch.Tensor, patch_rows) -> list[sampling.SliceSampler]:
        """One sampler per patch, on its rows of the latent (samplers are elementwise)."""
        dev = x.device
        if job.step_noises is not None:
            noise = sampling.StepNoise(noises=[n if n is None else n.to(dev, torch.float32)
                                               for n in job.step_noises])
        else:
            noise = sampling.StepNoise(job.seed, tuple(x.shape), device=dev)
        return [sampling.SliceSampler(job.sampler, sigmas, x[:, :, a:b], noise=noise.rows(slice(a, b)),
                                      options=job.sampler_options)
                for a, b in patch_rows]

    # ------------------------------------------------------------------ pieces of the loop
    def _agree_cancel(self) -> bool:
        """Every rank calls this at the same point of every evaluation; all get the same answer."""
        flag = bool(self.cancel_requested())
        if self.mesh.world == 1 or self.mesh.ctrl is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        self.mesh.comm.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.ctrl)
        return bool(t.item())

    def _views(self, st: JobState, step: int) -> list[View]:
        """Warm-up steps (every step without PipeFusion) evaluate all patches at once, pipelined steps one
        patch after another; each list is built once per job, at first use."""
        pipelined = step >= st.warmup
        views = st.views.get(pipelined)
        if views is None:
            M = st.layout.patches
            patches = [[m] for m in range(M)] if pipelined else [list(range(M))]
            r, u = self.mesh.index("ring"), self.mesh.index("ulysses")
            views = st.views[pipelined] = [View.of(ps, st, r, u) for ps in patches]
        return views

    def _advance(self, st: JobState, e: int, view: View, tokens: torch.Tensor) -> None:
        """The last stage, from the view's final-layer tokens: denoised, guidance, each patch's sampler step
        and its next input."""
        sigma = st.evals[e][0]
        v_pred = self.model.unpatchify(tokens, st.grid, rows=view.token_rows)
        x_eval = torch.cat([st.inputs[m] for m in view.patches], dim=2)
        den = self._guided(st, sigma, v_pred.split(st.batches), x_eval)
        r0, r1 = view.rows
        if st.x0 is not None:
            st.x0[:, :, r0:r1] = den
        for m in view.patches:
            a, b = st.patch_rows[m]
            st.samplers[m].feed(den[:, :, a - r0:b - r0])
            if e + 1 < len(st.evals):
                st.inputs[m] = st.samplers[m].next_input()[0]
                self.step.hand_off(st, e, m)

    def _guided(self, st: JobState, sigma: float, v_preds, x_eval: torch.Tensor) -> torch.Tensor:
        """Denoised of each entry, averaged per side by strength, then classifier-free guidance."""
        B = st.shape[0]
        s = torch.tensor(sigma, dtype=torch.float32)
        acc = [torch.zeros_like(x_eval), torch.zeros_like(x_eval)]
        for g, vp in zip(st.groups, v_preds):
            for i, (entry, side) in enumerate(zip(g.entries, g.sides)):
                den = st.ms.calculate_denoised(s, vp[i * B:(i + 1) * B], x_eval)
                acc[side] = acc[side] + den * entry.strength
        if self.mesh.degree("cfg") == 2 and st.use_uncond:
            mine = self.mesh.index("cfg")
            pair = [torch.empty_like(acc[mine]) for _ in range(2)]
            self.mesh.comm.all_gather(pair, acc[mine].contiguous(), group=self.mesh.groups["cfg"])
            acc = pair
        w = st.weights                                    # 0-dim CPU tensors: kernel scalars, no copy
        cond = acc[1] / w[1]
        if not st.use_uncond:
            return cond
        uncond = acc[0] / w[0]
        return uncond + (cond - uncond) * st.job.guidance

    def _progress(self, st: JobState, step: int, steps: int):
        job, preview = st.job, None
        if job.preview_every and st.x0 is not None and (step % job.preview_every == 0 or step == steps):
            preview = st.x0[:1].to(torch.float16).cpu()
        self.report({"type": "progress", "step": step, "total": steps, "preview": preview})

    @staticmethod
    def _release(st: JobState) -> None:
        """Finish all sends (the next job starts with empty channels) and free PipeFusion's K/V buffer."""
        st.links.settle()
        if st.kv_buffer is not None:
            st.kv_buffer.clear()

    def _finish(self, st: JobState) -> torch.Tensor | None:
        """The final LATENT on rank 0 (sent there by the reporting rank of the last stage)."""
        final = None
        if self.reporter:
            x = torch.cat([s.x for s in st.samplers], dim=2)
            final = sampling.final_latent(st.ms, st.sigmas, x).float().contiguous()
        if self.P > 1:
            if self.reporter:
                self.mesh.comm.send(final, 0, group=self.mesh.p2p["latent"])
                final = None
            elif self.mesh.rank == 0:
                final = torch.empty(st.shape, device=self.model.device, dtype=torch.float32)
                self.mesh.comm.recv(final, self.mesh.rank_at(pp=self.P - 1), group=self.mesh.p2p["latent"])
        return final.cpu() if final is not None else None
