"""The sampling loop every rank runs, for any mesh: serial, CFG parallel, Ulysses/Ring/USP, PipeFusion and
their products. One code path: without PipeFusion there is one stage and one patch.

Per model evaluation (a sampler step, or one of heun's two):
- stage 0 embeds its token pieces of the latent rows being processed;
- each stage runs its block range; hidden states go to the next stage, skip activations to the stage of
  the block that consumes them (routed by block index, so any stage split works);
- the last stage runs the final layer, gathers the tokens of its sequence-parallel group, turns the
  v-prediction into denoised, averages conditioning entries by strength (as ComfyUI), exchanges the
  result with its CFG partner, applies guidance and the sampler step per patch (samplers are elementwise)
  and sends each patch's next input to stage 0.
PipeFusion pipelines patches after `warmup_steps` synchronous steps; self-attention then reads a K/V buffer
in which the patches not yet processed this step are one step stale.
Without PipeFusion (one stage) the model part of an evaluation is one function of the scaled latent, the
timestep and the text (`_whole_tokens`), which the runtime's CUDA graphs record and replay.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import sampling
from ..job import CondEntry, Job, JobCancelled, JobError
from ..model import HunyuanDiT, LocalAttention, TokenGrid
from ..model.hunyuandit import TextConditions
from ..plan import ParallelConfig
from .layout import TokenLayout, even_split, offsets
from .graphs import GraphCache
from .mesh import Mesh
from .sequence import KVBuffer, SequenceParallelAttention


def stage_blocks(depth: int, stages: int) -> list[range]:
    """Contiguous block ranges of each pipeline stage (as even as possible, earlier stages larger)."""
    sizes = even_split(depth, stages)
    return [range(o, o + n) for o, n in zip(offsets(sizes), sizes)]


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


class _Pending:
    """Outstanding async sends, kept alive until complete; settled a couple of evaluations later."""

    def __init__(self):
        self.items: deque = deque()

    def add(self, ev: int, work):
        self.items.append((ev, work))

    def settle(self, before: int | None = None):
        while self.items and (before is None or self.items[0][0] < before):
            self.items.popleft()[1].wait()


class Runner:
    """One rank's share of a job on a mesh. The model holds this rank's weights (all blocks)."""

    def __init__(self, model: HunyuanDiT, mesh: Mesh, plan: ParallelConfig, *, backend: str = "auto",
                 report: Callable[[dict], None] | None = None,
                 cancel_requested: Callable[[], bool] | None = None, graphs: GraphCache | None = None):
        self.model, self.mesh, self.plan, self.backend = model, mesh, plan, backend
        self.report = report or (lambda msg: None)
        self.cancel_requested = cancel_requested or (lambda: False)
        cfg = model.cfg
        self.P = mesh.degree("pp")
        self.stages = stage_blocks(cfg.depth, self.P)
        self.stage = mesh.index("pp")
        self.blocks = self.stages[self.stage]
        self.first, self.last = self.stage == 0, self.stage == self.P - 1
        stage_of = {b: s for s, rng in enumerate(self.stages) for b in rng}
        # skip routing by block index: what this stage sends where, and receives from where
        self.skip_to: dict[int, list[int]] = {}        # consumer stage -> producer blocks of mine
        self.skip_from: dict[int, list[int]] = {}      # producer stage -> producer blocks I consume
        for b in self.blocks:
            if cfg.is_skip_source(b) and stage_of[cfg.depth - 1 - b] != self.stage:
                self.skip_to.setdefault(stage_of[cfg.depth - 1 - b], []).append(b)
            src = cfg.skip_source(b)
            if src is not None and stage_of[src] != self.stage:
                self.skip_from.setdefault(stage_of[src], []).append(src)
        for blks in (*self.skip_to.values(), *self.skip_from.values()):
            blks.sort()                                # both ends order a message by producer block
        self.kv_buffer = KVBuffer() if self.P > 1 else None
        self.reporter = self.last and mesh.index("cfg") == 0 and mesh.sp_index == 0
        self.graphs = graphs                           # CUDA graphs of the whole model call (or None)
        self.token: object = None                      # the current run, for the graphs' per-job inputs
        self.setup_phases: dict = {}                   # host seconds of each part of the set-up (stats)
        self._whole_call = None                        # (key, fn, per-job inputs) of the graphed call

    # ------------------------------------------------------------------ small helpers
    def _peer(self, **coords) -> int:
        return self.mesh.rank_at(**coords)

    def _recv(self, shape, dtype, src_stage: int, flow: str) -> torch.Tensor:
        buf = torch.empty(shape, device=self.model.device, dtype=dtype)
        dist.irecv(buf, self._peer(pp=src_stage), group=self.mesh.p2p[flow]).wait()
        return buf

    def _send(self, ev: int, t: torch.Tensor, dst_stage: int, flow: str):
        self.pending.add(ev, dist.isend(t.contiguous(), self._peer(pp=dst_stage), group=self.mesh.p2p[flow]))

    def _agree_cancel(self) -> bool:
        """Every rank calls this at the same point of every evaluation; all get the same answer."""
        flag = bool(self.cancel_requested())
        if self.mesh.world == 1 or self.mesh.ctrl is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.ctrl)
        return bool(t.item())

    # ------------------------------------------------------------------ the job
    @torch.no_grad()
    def run(self, job: Job) -> torch.Tensor | None:
        t_mark = time.perf_counter()
        self.setup_phases, self.token, self._whole_call = {}, object(), None      # a Runner may run many jobs

        def mark(name: str):
            nonlocal t_mark
            now = time.perf_counter()
            self.setup_phases[name], t_mark = now - t_mark, now

        model, mesh = self.model, self.mesh
        cfg, dev, dt = model.cfg, model.device, model.dtype
        self.job = job
        ms = sampling.DiscreteVSampling.for_model(cfg)
        sigmas = job.sigmas.to(torch.float32).cpu()
        steps = len(sigmas) - 1
        x = sampling.initial_latent(ms, sigmas, job.noise.float(), job.latent.float()).to(dev, torch.float32)
        mark("latent")
        B, _, H, W = x.shape
        p = cfg.patch_size
        grid = TokenGrid(H, W, p)
        P = self.P
        M = self.plan.patches if P > 1 else 1
        layout = TokenLayout(grid.rows, grid.cols, patches=M, ring=mesh.degree("ring"),
                             ulysses=mesh.degree("ulysses"))
        rope_full = model.rope(grid)
        rope_of: dict[tuple, tuple] = {}           # this rank's RoPE rows per view (built once per job)
        patch_rows = [layout.patch_latent_rows(m, p, H) for m in range(M)]

        self.use_uncond = job.uses_uncond()
        if mesh.degree("cfg") == 2:
            sides = [mesh.index("cfg")] if self.use_uncond else [1]
        else:
            sides = [0, 1] if self.use_uncond else [1]
        groups = call_groups(job, sides)
        for g in groups:
            g.text = model.encode_text(**batched_kwargs(g.entries, B), batch=len(g.entries) * B)
        batches = [len(g.entries) * B for g in groups]
        self.weights = [side_weight(job.negative), side_weight(job.positive)]
        mark("text")

        whole = P == 1                                 # one stage: the whole model call per evaluation
        if mesh.sp_degree == 1 and P == 1:
            attn = LocalAttention(self.backend)        # traceable: stays inside compiled block graphs
        else:
            attn = SequenceParallelAttention(mesh, layout, self.backend, self.kv_buffer)
        if whole:
            for g in groups:
                model.fill_text_kv(g.text)             # every block's text K/V, once per job
        mark("attention")
        evals = list(zip(sampling.evaluation_sigmas(job.sampler, sigmas, job.sampler_options),
                         sampling.evaluation_steps(job.sampler, sigmas, job.sampler_options)))
        warm = self.plan.warmup_steps if P > 1 else steps + 1
        # timesteps of every evaluation, moved to the device once (a per-step copy would wait for the GPU)
        timesteps = ms.timestep(torch.tensor([sg for sg, _ in evals], dtype=torch.float32)).to(dev)
        mark("schedule")
        self.pending = _Pending()

        samplers, inputs, x0 = None, [None] * M, None
        if self.last:                                  # samplers (one per patch) live on the last stage
            if job.step_noises is not None:
                noise = sampling.StepNoise(noises=[n if n is None else n.to(dev, torch.float32)
                                                   for n in job.step_noises])
            else:
                noise = sampling.StepNoise(job.seed, tuple(x.shape), device=dev)
            samplers = [sampling.SliceSampler(job.sampler, sigmas, x[:, :, a:b], noise=noise.rows(slice(a, b)),
                                              options=job.sampler_options)
                        for a, b in patch_rows]
            x0 = torch.zeros_like(x) if self.reporter else None
        x_cur = x.clone() if self.first else None      # stage 0: the latest model input of every patch
        mark("samplers")

        for e, (sigma, step_i) in enumerate(evals):
            if self._agree_cancel():
                self._drain(x_cur, patch_rows, inputs_sent=e > 0)
                raise JobCancelled(f"cancelled before step {step_i + 1} of {steps}")
            self.pending.settle(before=e - 1)
            if e == 0 and P > 1 and self.last:
                # the first inputs of every patch; sent after the first agreement, so that stage 0 is not
                # inside that agreement while NCCL sets up this pair's communicator (both must join)
                for m in range(M):
                    inputs[m] = samplers[m].next_input()[0]
                    self._send(0, inputs[m], 0, "latent")
            conds = None if whole else [model.conditions(g.text, timesteps[e:e + 1]) for g in groups]
            views = [list(range(M))] if step_i < warm else [[m] for m in range(M)]
            for view in views:
                ranges = layout.ranges(view, mesh.index("ring"), mesh.index("ulysses"))
                n_mine = sum(b - a for a, b in ranges)
                r0, r1 = patch_rows[view[0]][0], patch_rows[view[-1]][1]
                if tuple(view) not in rope_of:
                    rope_of[tuple(view)] = tuple(torch.cat([tab[a:b] for a, b in ranges]) for tab in rope_full)
                rope = rope_of[tuple(view)]
                attn.patches = view
                if whole:            # one stage: the whole model call (graphed on GPUs)
                    for m in view:
                        inputs[m] = samplers[m].next_input()[0]
                        x_cur[:, :, patch_rows[m][0]:patch_rows[m][1]] = inputs[m]
                    xin = ms.calculate_input(torch.tensor(sigma), _padded_rows(x_cur, r0, r1, p))
                    out_tok = self._evaluate_whole(xin, timesteps[e:e + 1], groups, rope, attn, batches,
                                                   (layout, view, ranges))
                else:                # a PipeFusion stage
                    # ---- stage input: tokens of my pieces, for every call group
                    if self.first:
                        for m in view:
                            a, b = patch_rows[m]
                            x_cur[:, :, a:b] = self._recv(x_cur[:, :, a:b].shape, torch.float32, P - 1, "latent")
                        xin = ms.calculate_input(torch.tensor(sigma), _padded_rows(x_cur, r0, r1, p))
                        tok = model.embed_image(xin)
                        v0 = layout.patch_tokens(view[0])[0]
                        tok = torch.cat([tok[:, a - v0:b - v0] for a, b in ranges], dim=1)
                        hidden = torch.cat([tok.repeat(n // B, 1, 1) for n in batches])
                    else:
                        hidden = self._recv((sum(batches), n_mine, cfg.hidden_size), dt, self.stage - 1, "hidden")
                    skips_in = {}
                    for src, blks in sorted(self.skip_from.items()):
                        buf = self._recv((len(blks), sum(batches), n_mine, cfg.hidden_size), dt, src, "skip")
                        skips_in.update(zip(blks, buf.unbind(0)))
                    # ---- my blocks, per call group
                    outs, produced = [], []
                    for gi, (cond, part) in enumerate(zip(conds, hidden.split(batches))):
                        attn.key = gi
                        o = sum(batches[:gi])
                        skips = {blk: s[o:o + batches[gi]] for blk, s in skips_in.items()}
                        outs.append(model.run_blocks(part, cond, rope, self.blocks, skips, attn))
                        produced.append(skips)
                    for dst, blks in sorted(self.skip_to.items()):
                        self._send(e, torch.stack([torch.cat([s[b] for s in produced]) for b in blks]), dst, "skip")
                    if not self.last:
                        self._send(e, torch.cat(outs), self.stage + 1, "hidden")
                        continue
                    # ---- last stage: prediction, guidance, sampler step of each patch in the view
                    out_tok = torch.cat([model.final_tokens(o, c) for o, c in zip(outs, conds)])
                    out_tok = self._gather_sp(out_tok, layout, view, ranges)
                rows_tok = (layout.patch_row_start[view[0]],
                            layout.patch_row_start[view[-1]] + layout.patch_rows[view[-1]])
                v_pred = model.unpatchify(out_tok, grid, rows=rows_tok)
                x_eval = torch.cat([inputs[m] for m in view], dim=2)
                den = self._guided(ms, sigma, v_pred.split(batches), groups, x_eval, B)
                if x0 is not None:
                    x0[:, :, r0:r1] = den
                for m in view:
                    a, b = patch_rows[m]
                    samplers[m].feed(den[:, :, a - r0:b - r0])
                    if e + 1 < len(evals):
                        if P > 1:
                            inputs[m] = samplers[m].next_input()[0]
                            self._send(e, inputs[m], 0, "latent")
            last_of_step = e + 1 == len(evals) or evals[e + 1][1] != step_i
            if self.reporter and last_of_step:
                self._progress(job, step_i + 1, steps, x0)
        self.pending.settle()
        if self.kv_buffer is not None:
            self.kv_buffer.clear()
        return self._finish(ms, sigmas, samplers, x.shape)

    # ------------------------------------------------------------------ pieces of the loop
    def _whole_tokens(self, xin, t, texts: list[TextConditions], rope, attn, batches: list[int], where) -> torch.Tensor:
        """Final-layer tokens of every call group for the whole latent: one stage; with sequence parallelism
        this rank runs its token pieces and the tokens of the whole image are gathered at the end."""
        model, B = self.model, xin.shape[0]
        layout, view, ranges = where
        tok = model.embed_image(xin)
        if self.mesh.sp_degree > 1:
            tok = torch.cat([tok[:, a:b] for a, b in ranges], dim=1)
        outs = []
        for gi, (text, n) in enumerate(zip(texts, batches)):
            attn.key = gi
            cond = model.conditions(text, t)
            o = model.run_blocks(tok.repeat(n // B, 1, 1), cond, rope, self.blocks, {}, attn)
            outs.append(model.final_tokens(o, cond))
        return self._gather_sp(torch.cat(outs), layout, view, ranges)

    def _evaluate_whole(self, xin, t, groups: list[CallGroup], rope, attn, batches: list[int], where) -> torch.Tensor:
        """_whole_tokens, through a CUDA graph when the runtime keeps graphs (and, for Ulysses / Ring, records
        their collectives): the same function on fixed buffers; its inputs are the scaled latent and the
        timestep (per step) and each group's pooled text vector and text K/V (per job). The result is valid
        until the next evaluation."""
        cache = self.graphs
        if cache is None or (self.mesh.sp_degree > 1 and not cache.collectives):
            return self._whole_tokens(xin, t, [g.text for g in groups], rope, attn, batches, where)
        if self._whole_call is None:                   # one stage has one view: built once per job
            depth = len(self.model.blocks)
            per_job = [tt for g in groups for tt in (g.text.extra, *(x for kv in g.text.text_kv for x in kv))]

            def fn(xin, t, *flat):
                texts = []
                for i in range(len(groups)):
                    part = flat[i * (1 + 2 * depth):(i + 1) * (1 + 2 * depth)]
                    texts.append(TextConditions(text=None, extra=part[0],
                                                text_kv=[(part[1 + 2 * j], part[2 + 2 * j]) for j in range(depth)]))
                return self._whole_tokens(xin, t, texts, rope, attn, batches, where)

            key = ("whole", tuple(batches), attn.backend, self.model.cross_backend, tuple(self.blocks),
                   tuple(self.plan.mesh_degrees.items()), self.mesh.rank, tuple(where[2]))
            self._whole_call = (key, fn, per_job)
        key, fn, per_job = self._whole_call
        return cache(key, fn, [xin, t], per_job, job=self.token, keep=tuple(rope),
                     communicates=self.mesh.sp_degree > 1)

    def _gather_sp(self, tok: torch.Tensor, layout: TokenLayout, view: list[int], ranges) -> torch.Tensor:
        """Final-layer tokens of my pieces -> tokens of the whole view, on every rank of the SP group."""
        mesh = self.mesh
        if mesh.sp_degree == 1:
            return tok
        U, R = mesh.degree("ulysses"), mesh.degree("ring")
        lens = [sum(layout.piece_len(m, r, u) for m in view) for r in range(R) for u in range(U)]
        n = max(lens)
        padded = torch.nn.functional.pad(tok, (0, 0, 0, n - tok.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in lens]
        dist.all_gather(parts, padded, group=mesh.sp_group)
        v0, v1 = layout.patch_tokens(view[0])[0], layout.patch_tokens(view[-1])[1]
        out = tok.new_empty(tok.shape[0], v1 - v0, tok.shape[2])
        for i, part in enumerate(parts):
            r, u = divmod(i, U)
            pos = 0
            for a, b in layout.ranges(view, r, u):
                out[:, a - v0:b - v0] = part[:, pos:pos + b - a]
                pos += b - a
        return out

    def _guided(self, ms, sigma, v_preds, groups, x_eval, B) -> torch.Tensor:
        """Denoised of each entry, averaged per side by strength, then classifier-free guidance."""
        s = torch.tensor(sigma, dtype=torch.float32)
        acc = [torch.zeros_like(x_eval), torch.zeros_like(x_eval)]
        for g, vp in zip(groups, v_preds):
            for i, (entry, side) in enumerate(zip(g.entries, g.sides)):
                den = ms.calculate_denoised(s, vp[i * B:(i + 1) * B], x_eval)
                acc[side] = acc[side] + den * entry.strength
        if self.mesh.degree("cfg") == 2 and self.use_uncond:
            mine = self.mesh.index("cfg")
            pair = [torch.empty_like(acc[mine]) for _ in range(2)]
            dist.all_gather(pair, acc[mine].contiguous(), group=self.mesh.groups["cfg"])
            acc = pair
        w = self.weights                                  # 0-dim CPU tensors: kernel scalars, no copy
        cond = acc[1] / w[1]
        if not self.use_uncond:
            return cond
        uncond = acc[0] / w[0]
        return uncond + (cond - uncond) * self.job.cfg

    def _progress(self, job: Job, step: int, steps: int, x0: torch.Tensor | None):
        preview = None
        if job.preview_every and x0 is not None and (step % job.preview_every == 0 or step == steps):
            preview = x0[:1].to(torch.float16).cpu()
        self.report({"type": "progress", "step": step, "total": steps, "preview": preview})

    def _drain(self, x_cur, patch_rows, inputs_sent: bool):
        """On cancel: receive the patch inputs already sent for the next evaluation, finish all sends,
        so the next job starts with empty channels."""
        if self.P > 1 and self.first and inputs_sent:
            for a, b in patch_rows:
                self._recv(x_cur[:, :, a:b].shape, torch.float32, self.P - 1, "latent")
        self.pending.settle()
        if self.kv_buffer is not None:
            self.kv_buffer.clear()

    def _finish(self, ms, sigmas, samplers, shape) -> torch.Tensor | None:
        """The final LATENT on rank 0 (sent there by the reporting rank of the last stage)."""
        final = None
        if self.reporter:
            x = torch.cat([s.x for s in samplers], dim=2)
            final = sampling.final_latent(ms, sigmas, x).float().contiguous()
        if self.P > 1:
            if self.reporter:
                dist.send(final, 0, group=self.mesh.p2p["latent"])
                final = None
            elif self.mesh.rank == 0:
                final = torch.empty(shape, device=self.model.device, dtype=torch.float32)
                dist.recv(final, self._peer(pp=self.P - 1), group=self.mesh.p2p["latent"])
        return final.cpu() if final is not None else None


def _padded_rows(x: torch.Tensor, r0: int, r1: int, p: int) -> torch.Tensor:
    """Latent rows r0..r1, padded to whole patches exactly as a circular pad of the whole latent would."""
    H, W = x.shape[-2:]
    rows = x[:, :, r0:r1]
    if r1 == H and H % p:
        rows = torch.cat([rows, x[:, :, : p - H % p]], dim=2)
    if W % p:
        rows = torch.cat([rows, rows[..., : p - W % p]], dim=3)
    return rows
