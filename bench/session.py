"""An artist's session, played through the node's real path and through KSampler on the same MODEL, in one
process: each event's seconds and the totals, side by side.

The MODEL is built by ComfyUI's own loader (comfy.sd.load_diffusion_model_state_dict) from random weights in
ComfyUI's layout, the LoRA (rank 16 on attn1.Wqkv, attn1.out_proj and mlp.fc1 of every block) applied by
ComfyUI's own LoRA code (comfy.sd.load_lora_for_models). The pack's side calls the sampler node's entry
(adapter.run_sampler) with the config node's value (adapter.build_parallel_config: strategy auto, compile
as the node's default, off); KSampler's side calls nodes.common_ksampler, what the KSampler node runs. The
pack's session runs first, from a cold pool and an empty compile cache; then KSampler's, from a MODEL ComfyUI
has not loaded yet.

Events (12 images): cold start, 3 more seeds, a prompt change, a LoRA added, its strength changed, the LoRA
removed, a new size, back to the first size, a restart (the pack: every pool closed, the compile cache kept
on disk, a pool started anew: what a change of devices or dtype, or a failed worker, costs; KSampler: every
model unloaded), a cfg change.

The spare workers (PoolConfig.spare_workers) start as the pack's entry point starts them when ComfyUI loads
it: before the MODEL is built, which takes the place of ComfyUI loading the checkpoint. The cold start's
compile cache is empty; the restart finds the spares the first pool had started after its first job. With
--restart comfyui the restart is ComfyUI's own: every pool and spare stopped, spares started as the entry point
starts them, the MODEL loaded again by ComfyUI's loader (on both sides), then the job.

    COMFYUI_DIR=/path/to/ComfyUI python bench/session.py --devices all --preset full --size 1024 --steps 50 --out DIR
    COMFYUI_DIR=... python bench/session.py --devices cpu:1 --preset comfy-tiny --size 64 --steps 2 --out DIR   # a test

Prints one line per event and a table; writes DIR/session.json (and DIR/session.png with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

EVENTS = ["cold start", "seed 2", "seed 3", "seed 4", "prompt change", "LoRA added", "LoRA strength changed",
          "LoRA removed", "new size", "back to the first size", "restart", "cfg change"]
LORA_RANK = 16
LORA_TARGETS = ("attn1.Wqkv", "attn1.out_proj", "mlp.fc1")


def import_comfyui(root: str):
    sys.path.insert(0, root)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import nodes  # noqa: F401
    return comfy


def architecture(name: str):
    from comfyui_xdit_hunyuan.model import HunyuanDiTConfig
    from comfyui_xdit_hunyuan.tiny import preset
    if name == "comfy-tiny":     # what ComfyUI's model detection accepts (real text widths), small
        return HunyuanDiTConfig(depth=6, hidden_size=128, num_heads=16, mlp_hidden=512)
    return preset(name)


def checkpoint(arch, seed: int) -> dict[str, torch.Tensor]:
    from comfyui_xdit_hunyuan.model import HunyuanDiT, init_random_
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = HunyuanDiT(arch, device=device)
    init_random_(model, seed)
    return {k: v.detach().to("cpu", torch.float16 if device == "cuda" else torch.float32).contiguous()
            for k, v in model.state_dict().items()}


def lora(arch, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd, d = {}, arch.hidden_size
    outs = {"attn1.Wqkv": 3 * d, "attn1.out_proj": d, "mlp.fc1": arch.mlp_hidden}
    for i in range(arch.depth):
        for target in LORA_TARGETS:
            key = f"diffusion_model.blocks.{i}.{target}"
            sd[f"{key}.lora_up.weight"] = torch.randn(outs[target], LORA_RANK, generator=g) * 0.02
            sd[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, d, generator=g) / d ** 0.5
    return sd


def conditioning(seed: int):
    """What CLIPTextEncode gives with HunyuanDiT's BERT + mT5 (random, of the real shapes)."""
    g = torch.Generator().manual_seed(seed)
    mb, mt = torch.zeros(1, 77, dtype=torch.long), torch.zeros(1, 256, dtype=torch.long)
    mb[:, :20], mt[:, :40] = 1, 1
    return [[torch.randn(1, 77, 1024, generator=g), {"attention_mask": mb, "attention_mask_mt5xl": mt,
                                                       "conditioning_mt5xl": torch.randn(1, 256, 2048, generator=g),
                                                       "pooled_output": torch.randn(1, 1024, generator=g)}]]


def load_model(comfy, sd: dict):
    """A MODEL by ComfyUI's loader (which empties the dict it is given: it gets a copy)."""
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    if model is None:
        raise RuntimeError("ComfyUI's loader did not recognise the checkpoint")
    return model


def session_inputs(comfy, arch, a):
    """The 12 events' inputs: (event, model, seed, cfg, positive, latent, restart)."""
    sd = checkpoint(arch, 0)
    model = load_model(comfy, sd)
    lora_sd = lora(arch, 1)
    with_lora = {s: comfy.sd.load_lora_for_models(model, None, lora_sd, s, 0)[0] for s in (0.8, 0.5)}
    pos_a, pos_b, neg = conditioning(1), conditioning(2), conditioning(3)
    w, h = a.size, a.size
    first = {"samples": torch.zeros(1, 4, h // 8, w // 8)}
    other = {"samples": torch.zeros(1, 4, (h * 7 // 8) // 64 * 8 or h // 8, (w * 9 // 8) // 64 * 8 or w // 8)}
    if a.size <= 128:            # a test: a small, different size
        other = {"samples": torch.zeros(1, 4, h // 8 + 2, w // 8 - 2)}
    ev = []
    for name in EVENTS:
        ev.append(dict(name=name, model=model, seed=1, cfg=5.0, positive=pos_a, latent=first, restart=False))
    for i, s in enumerate((2, 3, 4), start=1):
        ev[i]["seed"] = s
    for e in ev[4:]:
        e["positive"] = pos_b
    ev[5]["model"], ev[6]["model"] = with_lora[0.8], with_lora[0.5]
    ev[8]["latent"] = other
    ev[10]["restart"] = True
    if a.restart == "comfyui":            # ComfyUI's loader runs again after the restart: a new MODEL
        ev[10]["reload"] = lambda: load_model(comfy, sd)
    ev[11]["cfg"] = 7.0
    return ev, neg


def pack_setup(a, cache_dir: str):
    """The config node's value for the session (strategy auto), with its compile cache folder."""
    from comfyui_xdit_hunyuan import adapter
    from dataclasses import replace

    setup = adapter.build_parallel_config(devices=a.devices, strategy="auto", compile=a.compile)
    pool = replace(setup.pool, cache_dir=cache_dir, profile_dir=a.profile_dir)
    if a.spares is not None:
        pool = replace(pool, spare_workers=a.spares)
    return replace(setup, pool=pool)


def run_pack(events, neg, a, setup) -> list[dict]:
    from comfyui_xdit_hunyuan import adapter
    from comfyui_xdit_hunyuan.worker.client import close_pools, get_pool, shutdown_all, start_spares

    out, reloaded = [], None
    for e in events:
        if e["restart"] and a.restart == "comfyui":
            shutdown_all()                    # ComfyUI exits: pools and spares stop
            start_spares(setup.pool)          # ComfyUI starts and loads the pack, then the checkpoint
            t = time.perf_counter()
            reloaded = e["reload"]()
            print(f"    restart: spares started, the MODEL loaded in {time.perf_counter() - t:.2f} s before the job",
                  flush=True)
        elif e["restart"]:
            close_pools()
        model = e["model"] if reloaded is None else reloaded
        t0 = time.perf_counter()
        with torch.inference_mode():
            latent = adapter.run_sampler(model, e["seed"], a.steps, e["cfg"], a.sampler, "normal", e["positive"],
                                         neg, e["latent"], 1.0, setup)
        seconds = time.perf_counter() - t0
        pool = get_pool(adapter.sampler.pool_config(setup.pool, model, adapter.ComfyBackend()))
        stats = pool.last_stats
        rt = (stats.get("ranks") or [{}])[0].get("runtime") or {}
        steps = stats.get("step_seconds") or []
        out.append({"event": e["name"], "seconds": seconds, "latent": latent["samples"],
                    "weights": stats.get("weights"), "job_seconds": stats.get("job_seconds"),
                    "client_seconds": stats.get("client_seconds"), "weights_seconds": rt.get("weights_seconds"),
                    "eager": stats.get("eager"), "spares_taken": stats.get("spares_taken"),
                    "first_step_seconds": steps[0] if steps else None,
                    "other_steps_seconds": sum(steps[1:]) if steps else None,
                    "ranks": [{k: r.get(k) for k in ("device", "gpu_allocated_bytes", "gpu_reserved_bytes",
                                                     "rss_bytes", "runtime")} for r in stats.get("ranks") or []]})
        c = stats.get("client_seconds") or {}
        r0 = (stats.get("ranks") or [{}])[0]
        if c.get("start_seconds") is not None:
            print(f"    start phases {r0.get('start_phases')}, load phases {rt.get('load_phases')}, set-up phases "
                  f"{rt.get('setup_phases')}, spares taken {stats.get('spares_taken')}", flush=True)
            print(f"    compile times:\n{rt.get('compile_times')}", flush=True)
        print(f"  pack      {e['name']:<24} {seconds:7.2f} s   start {_s(c.get('start_seconds'))} stage "
              f"{_s(c.get('stage_seconds'))} weights {_s(rt.get('weights_seconds'))} first step "
              f"{_s(steps[0] if steps else None)} other steps {_s(sum(steps[1:]) if steps else None)}   "
              f"{stats.get('weights')}{'  eager (compiling in the background)' if stats.get('eager') else ''}",
              flush=True)
    return out


def _gpu_processes() -> None:
    """The spares' resident memory, and nvidia-smi's memory per GPU process (best effort: GPUs with nvidia-smi)."""
    import shutil
    import subprocess
    from comfyui_xdit_hunyuan.worker.spares import spares
    for slot, pid in spares.running().items():
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            print(f"spare {slot} (pid {pid}): resident memory {rss / 2**20:.0f} MiB", flush=True)
        except (OSError, ValueError):
            pass
    if torch.cuda.is_available() and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        print("GPU processes (pid, memory) after the pack's session: " + "; ".join(out.splitlines()), flush=True)


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_ksampler(comfy, events, neg, a) -> list[dict]:
    import nodes
    out, reloaded = [], None
    for e in events:
        if e["restart"]:
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
            if "reload" in e:
                reloaded = e["reload"]()
        model = e["model"] if reloaded is None else reloaded
        t0 = time.perf_counter()
        with torch.inference_mode():
            latent = nodes.common_ksampler(model, e["seed"], a.steps, e["cfg"], a.sampler, "normal",
                                           e["positive"], neg, e["latent"], denoise=1.0)[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out.append({"event": e["name"], "seconds": seconds, "latent": latent["samples"].float().cpu()})
        print(f"  KSampler  {e['name']:<24} {seconds:7.2f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="a ComfyUI checkout (COMFYUI_DIR)")
    ap.add_argument("--devices", default="all")
    ap.add_argument("--preset", default="full", help="full, small, comfy-tiny (what ComfyUI detects, tiny)")
    ap.add_argument("--size", type=int, default=1024, help="the first image size, pixels (square)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="the config node's compile (default off, as the node's)")
    ap.add_argument("--cache-dir", help="the compile cache folder (default: a new, empty one: a cold start)")
    ap.add_argument("--no-ksampler", action="store_true", help="the pack's session only")
    ap.add_argument("--profile-dir", help="each worker writes a cProfile of its first job there (slows it)")
    ap.add_argument("--spares", choices=("auto", "on", "off"), help="PoolConfig.spare_workers (default: its own)")
    ap.add_argument("--restart", choices=("pool", "comfyui"), default="pool",
                    help="the restart event: every pool closed (default), or ComfyUI restarted: pools and spares "
                         "stopped, spares started as at ComfyUI's start, the MODEL loaded again, then the job")
    ap.add_argument("--out", default="out/session")
    ap.add_argument("--verbose", action="store_true", help="the workers' own output (start-up times, compiler)")
    a = ap.parse_args(argv)
    if a.verbose:
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("comfyui_xdit_hunyuan.pool").setLevel(logging.INFO)
    if not a.comfyui:
        ap.error("needs a ComfyUI checkout: --comfyui PATH or COMFYUI_DIR")
    comfy = import_comfyui(a.comfyui)
    arch = architecture(a.preset)
    cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="xdit-session-cache-")
    setup = pack_setup(a, cache_dir)
    from comfyui_xdit_hunyuan.worker.client import start_spares
    started = start_spares(setup.pool)         # what the pack's entry point does when ComfyUI starts
    t0 = time.perf_counter()
    events, neg = session_inputs(comfy, arch, a)
    print(f"session: {a.preset} at {a.size}px, {a.steps} steps, {a.sampler}, devices {a.devices}, "
          f"{'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}; spare workers "
          f"{started or 'none'} started {time.perf_counter() - t0:.1f} s before the first image (the MODEL's "
          f"load in between)", flush=True)
    pack = run_pack(events, neg, a, setup)
    _gpu_processes()                               # the pool's workers and the spares it started, side by side
    from comfyui_xdit_hunyuan.worker.client import shutdown_all
    ks = [] if a.no_ksampler else run_ksampler(comfy, events, neg, a)
    from comfyui_xdit_hunyuan.compile_cache import size_bytes
    rows = []
    for i, p in enumerate(pack):
        row = {k: v for k, v in p.items() if k != "latent"}
        if ks:
            ref = ks[i]["latent"]
            row["ksampler_seconds"] = ks[i]["seconds"]
            row["rel_l2_vs_ksampler"] = float((p["latent"] - ref).norm() / ref.norm())
            row["max_rel_vs_ksampler"] = float((p["latent"] - ref).abs().max() / ref.abs().max())
        rows.append(row)
    warm = rows[1]["seconds"]
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "preset": a.preset, "size": a.size, "steps": a.steps, "sampler": a.sampler, "devices": a.devices,
              "events": rows, "pack_total_seconds": sum(r["seconds"] for r in rows),
              "compile_cache_bytes": size_bytes(Path(cache_dir)), "warm_image_seconds": warm}
    if ks:
        report["ksampler_total_seconds"] = sum(r["ksampler_seconds"] for r in rows)
        report["speedup"] = report["ksampler_total_seconds"] / report["pack_total_seconds"]
    shutdown_all()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "session.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{'event':<24} {'pack s':>8} {'+ warm':>8} {'KSampler s':>11} {'rel L2':>8}  weights sent / restored")
    for r in rows:
        w = r.get("weights") or {}
        print(f"{r['event']:<24} {r['seconds']:8.2f} {r['seconds'] - warm:+8.2f} "
              f"{r.get('ksampler_seconds', float('nan')):11.2f} {r.get('rel_l2_vs_ksampler', float('nan')):8.1e}  "
              f"{w.get('sent', '?')} / {w.get('restored', '?')}{' (whole)' if w.get('whole') else ''}")
    print(f"{'total':<24} {report['pack_total_seconds']:8.2f} {'':>8} "
          f"{report.get('ksampler_total_seconds', float('nan')):11.2f}"
          + (f"   pack {report['speedup']:.2f}x KSampler" if ks else ""))
    kernels = len(list(Path(cache_dir).rglob("*.cubin")))
    print(f"compile cache on disk: {report['compile_cache_bytes'] / 2**20:.1f} MiB ({cache_dir}), {kernels} "
          f"compiled GPU kernels in it")
    _chart(report, out / "session.png")
    return 0


def _chart(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["events"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar([i - 0.2 for i in x], [r["seconds"] for r in rows], 0.4, label="this pack")
    if "ksampler_total_seconds" in report:
        ax.bar([i + 0.2 for i in x], [r["ksampler_seconds"] for r in rows], 0.4, label="KSampler")
    ax.set_xticks(list(x), [r["event"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title(f"artist session, {report['device']}, {report['size']}px, {report['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
