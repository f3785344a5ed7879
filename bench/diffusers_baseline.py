"""diffusers' HunyuanDiT2DModel on one GPU, the baseline our 1-GPU path is compared with:

    python bench/diffusers_baseline.py [--pixels 1024] [--steps 50] [--compile]

Random full-size v1.2 weights, bf16, CFG as one batch of 2 (negative, positive), guidance 5, euler over
ComfyUI's normal schedule, the latent only (no text encoders, no VAE). Prints seconds for the sampling
loop of a warm process (the first, compiling call is timed separately).
"""
from __future__ import annotations

import argparse
import time

import torch


from comfyui_xdit_hunyuan import sampling  # noqa: E402
from comfyui_xdit_hunyuan.model import TokenGrid, rope_table  # noqa: E402
from comfyui_xdit_hunyuan.model.layouts import diffusers_config  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset, random_cond  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixels", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    from diffusers import HunyuanDiT2DModel

    cfg = preset("full")
    with torch.device("cuda"):
        model = HunyuanDiT2DModel(**diffusers_config(cfg)).to(torch.bfloat16).eval().requires_grad_(False)
    conds = [random_cond(cfg, s) for s in (2, 1)]
    kw = {k: torch.cat([getattr(c, k) for c in conds]).cuda() for k in
          ("context", "text_embedding_mask", "encoder_hidden_states_t5", "text_embedding_mask_t5")}
    kw = dict(encoder_hidden_states=kw["context"].bfloat16(), text_embedding_mask=kw["text_embedding_mask"],
              encoder_hidden_states_t5=kw["encoder_hidden_states_t5"].bfloat16(),
              text_embedding_mask_t5=kw["text_embedding_mask_t5"])
    h = a.pixels // 8
    rope = tuple(t.cuda() for t in rope_table(TokenGrid(h, h), cfg.head_dim))
    ms = sampling.DiscreteVSampling.for_model(cfg)
    sigmas = sampling.calculate_sigmas(ms, "normal", a.steps)
    fwd = torch.compile(model) if a.compile else model

    def denoise(x, sigma):
        s = torch.tensor(sigma)
        xin = ms.calculate_input(s, x).bfloat16().repeat(2, 1, 1, 1)
        t = ms.timestep(s.reshape(1)).cuda().repeat(2).bfloat16()     # as diffusers' pipeline passes it
        v = fwd(xin, t, image_rotary_emb=rope, return_dict=False, **kw)[0][:, :4].float()
        den = ms.calculate_denoised(s, v, x.repeat(2, 1, 1, 1))
        return den[0:1] + (den[1:2] - den[0:1]) * 5.0

    x0 = sampling.initial_latent(ms, sigmas, torch.randn(1, 4, h, h), torch.zeros(1, 4, h, h)).cuda()
    with torch.no_grad():
        t0 = time.perf_counter()
        sampling.sample(denoise, x0, sigmas[:3], "euler")
        torch.cuda.synchronize()
        print(f"first (warm-up{', compiling' if a.compile else ''}) 2-step call: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        sampling.sample(denoise, x0, sigmas, "euler")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    print(f"diffusers HunyuanDiT2DModel {'compiled' if a.compile else 'eager'} {a.pixels}^2 bf16 CFG: "
          f"{a.steps} steps {dt:.2f} s ({1000 * dt / a.steps:.1f} ms/step) on {torch.cuda.get_device_name(0)}")


if __name__ == "__main__":
    main()
