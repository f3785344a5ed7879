"""The device mesh: world = cfg (outermost) x pipefusion x ring x ulysses (innermost, contiguous ranks).

Built once per (degrees) from the default process group and passed explicitly to every parallel piece;
nothing here is global, so two meshes can coexist in one process. The parallel code communicates only
through the mesh's `comm` (parallel/collectives.py): torch.distributed for a real mesh (`build_mesh`); for
`standin_mesh` (one rank of a plan, alone on one device: bench/floors.py) stand-ins that move no data
between ranks, with stand-in groups of the real groups' sizes.

Example, 8 ranks, cfg 2 x pipefusion 2 x ring 1 x ulysses 2: ulysses groups [0,1] [2,3] [4,5] [6,7];
pipefusion (stage) groups [0,2] [1,3] [4,6] [5,7]; cfg groups [0,4] [1,5] [2,6] [3,7].
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from .collectives import TORCH, LocalGroup, LocalStandIn

AXES = ("cfg", "pp", "ring", "ulysses")          # outermost first


@dataclass
class Mesh:
    degrees: dict[str, int]                        # axis -> degree
    rank: int
    coords: dict[str, int]                         # axis -> this rank's index along it
    groups: dict[str, object] = field(default_factory=dict)   # axis -> process group of this rank (or None)
    sp_group: object = None                        # ring x ulysses of this rank
    p2p: dict[str, object] = field(default_factory=dict)      # PipeFusion flows -> process group (whole world)
    ctrl: object = None                            # CPU (gloo) group of the whole world: cancel agreement
    comm: object = TORCH                           # the collectives (parallel/collectives.py)

    @property
    def world(self) -> int:
        n = 1
        for a in AXES:
            n *= self.degrees[a]
        return n

    def degree(self, axis: str) -> int:
        return self.degrees[axis]

    def index(self, axis: str) -> int:
        return self.coords[axis]

    def rank_at(self, **coords) -> int:
        """Global rank of the rank whose coordinates equal this rank's except those given."""
        c = {**self.coords, **coords}
        r = 0
        for a in AXES:
            r = r * self.degrees[a] + c[a]
        return r

    @property
    def sp_degree(self) -> int:
        return self.degrees["ring"] * self.degrees["ulysses"]

    @property
    def sp_index(self) -> int:
        return self.coords["ring"] * self.degrees["ulysses"] + self.coords["ulysses"]


def coords_of(rank: int, degrees: dict[str, int]) -> dict[str, int]:
    out = {}
    for a in reversed(AXES):
        out[a] = rank % degrees[a]
        rank //= degrees[a]
    return {a: out[a] for a in AXES}


def build_mesh(degrees: dict[str, int], rank: int, *, ctrl=None) -> Mesh:
    """Create every process group of the mesh. Collective: all ranks call it with the same degrees.

    Groups are only created when the world has more than one rank; with one rank every group is None
    and no torch.distributed call is made.
    """
    degrees = {a: int(degrees.get(a, 1)) for a in AXES}
    mesh = Mesh(degrees=degrees, rank=rank, coords=coords_of(rank, degrees), ctrl=ctrl)
    world = mesh.world
    if world == 1:
        return mesh
    if not dist.is_initialized() or dist.get_world_size() != world:
        raise RuntimeError(f"the mesh needs {world} ranks in torch.distributed's default group")
    all_coords = [coords_of(r, degrees) for r in range(world)]
    for axis in AXES:
        # one group per combination of the other coordinates; every rank creates all of them, in order
        others = [a for a in AXES if a != axis]
        for combo in itertools.product(*(range(degrees[a]) for a in others)):
            ranks = [r for r, c in enumerate(all_coords) if all(c[a] == v for a, v in zip(others, combo))]
            g = dist.new_group(ranks) if degrees[axis] > 1 else None
            if rank in ranks:
                mesh.groups[axis] = g
    for combo in itertools.product(range(degrees["cfg"]), range(degrees["pp"])):
        ranks = [r for r, c in enumerate(all_coords) if (c["cfg"], c["pp"]) == combo]
        g = dist.new_group(ranks) if mesh.sp_degree > 1 else None
        if rank in ranks:
            mesh.sp_group = g
    if degrees["pp"] > 1:
        # separate communicators per PipeFusion flow, so that sends in one direction never queue behind
        # receives of another flow between the same pair of ranks (NCCL orders p2p per communicator)
        for flow in ("hidden", "skip", "latent"):
            mesh.p2p[flow] = dist.new_group(list(range(world)))
        _connect_pairs(mesh, all_coords)
    return mesh


def standin_mesh(degrees: dict[str, int], rank: int) -> Mesh:
    """Rank `rank` of a mesh of `degrees`, alone: its coordinates, stand-in groups of the real groups' sizes
    (`collectives.LocalGroup`, None where the real group is None) and the stand-in collectives, no control
    group (cancellation is then this rank's own). Makes no torch.distributed call.

    Example, degrees cfg 2 x ulysses 2, rank 3: coords {cfg: 1, pp: 0, ring: 0, ulysses: 1}; groups cfg
    LocalGroup("cfg", 2, 1) and ulysses LocalGroup("ulysses", 2, 1), pp and ring None; sp_group
    LocalGroup("sp", 2, 1); world 4, as for build_mesh on rank 3 of 4 processes.
    """
    degrees = {a: int(degrees.get(a, 1)) for a in AXES}
    mesh = Mesh(degrees=degrees, rank=rank, coords=coords_of(rank, degrees), comm=LocalStandIn())
    if mesh.world == 1:
        return mesh
    for axis in AXES:
        mesh.groups[axis] = LocalGroup(axis, degrees[axis], mesh.coords[axis]) if degrees[axis] > 1 else None
    mesh.sp_group = LocalGroup("sp", mesh.sp_degree, mesh.sp_index) if mesh.sp_degree > 1 else None
    if degrees["pp"] > 1:
        mesh.p2p = {flow: LocalGroup(flow, mesh.world, rank) for flow in ("hidden", "skip", "latent")}
    return mesh


def _connect_pairs(mesh: Mesh, all_coords: list[dict[str, int]]) -> None:
    """Set up every PipeFusion point-to-point channel now, in one global order.

    NCCL creates a pair's communicator at its first send/recv, and that creation blocks until both ranks
    join it. In a pipelined step stage 0 first sends skips, then hidden states, while stage 1 first
    receives hidden states: each would wait inside a different communicator's creation, for ever (seen
    on two H100s). Exchanging one element per (flow, pair) in lexicographic order cannot deadlock: the
    smallest unfinished pair always has both of its ranks waiting on it.
    """
    import torch
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    pairs = [(a, b) for a in range(len(all_coords)) for b in range(a + 1, len(all_coords))
             if all(all_coords[a][x] == all_coords[b][x] for x in AXES if x != "pp")]
    token = torch.zeros(1, device=dev)
    for flow in ("hidden", "skip", "latent"):
        group = mesh.p2p[flow]
        for a, b in pairs:
            if mesh.rank == a:
                dist.send(token, b, group=group)
                dist.recv(token, b, group=group)
            elif mesh.rank == b:
                dist.recv(token, a, group=group)
                dist.send(token, a, group=group)
