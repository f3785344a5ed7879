"""`generate`: a prompt through a diffusers-format HunyuanDiT directory -> PNG. The directory's BERT and
mT5 encode the text and its VAE decodes (text_vae.py, on --text-device) while our HunyuanDiT samples on the
worker pool; the workers start in the background while the text is encoded.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from contextlib import contextmanager
from pathlib import Path

from .outputs import preview_writer, write_outputs
from .printout import describe_model, print_settings, say
from .session import PoolSession, run_guarded
from .settings import Settings, common_settings, latent_hw, prepare_out, preflight, resolve_plan, sampling_inputs
from .usage import EXIT_OK, UsageError
from .weights import checkpoint_ref, param_count


@contextmanager
def model_dir_words(root: Path):
    """text_vae.ModelDirError as UsageError naming --model-dir."""
    from comfyui_xdit_hunyuan.text_vae import ModelDirError

    try:
        yield
    except ModelDirError as e:
        text = str(e)
        about_root = text.startswith((f"{root}:", f"{root} "))        # else about a file or folder in it
        raise UsageError(f"--model-dir {text}" if about_root else f"--model-dir {root}: {text}") from e


def pick_text_device(spec: str, s: Settings) -> str:
    import torch

    if spec == "auto":
        return s.devices[0] if s.gpu else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--text-device '{spec}': write 'cpu', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if (dev.index or 0) >= n:
            raise UsageError(f"--text-device '{spec}': this machine has {'GPUs 0..' + str(n - 1) if n else 'no GPU'}; "
                             f"use {'cuda:0' if n else 'cpu'}")
    elif dev.type != "cpu":
        raise UsageError(f"--text-device '{spec}': write 'cpu', 'cuda:N' or 'auto'")
    return str(dev)


def run_generate(args: argparse.Namespace) -> int:
    from comfyui_xdit_hunyuan import text_vae
    from comfyui_xdit_hunyuan.job import Job
    from comfyui_xdit_hunyuan.tiny import random_cond

    missing = [m for m in ("transformers", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"generate needs {' and '.join(missing)} (the text encoders and the VAE): "
                         f"pip install {' '.join(missing)}")
    s = common_settings(args)
    root = Path(args.model_dir).expanduser()
    with model_dir_words(root):
        md = text_vae.check_model_dir(root)
    if s.width % md.vae_factor or s.height % md.vae_factor:
        raise UsageError(f"--size {s.width}x{s.height}: this VAE needs multiples of {md.vae_factor} pixels")
    arch = md.arch
    text_device = pick_text_device(args.text_device, s)
    hw = latent_hw(s, md.vae_factor)
    resolve_plan(s, arch, hw)
    latent, noise, sigmas = sampling_inputs(s, arch, hw)
    weights = checkpoint_ref(root / "transformer")

    def job(positive, negative) -> Job:
        return Job(weights=weights, positive=[positive], negative=[negative], latent=latent, noise=noise,
                   sigmas=sigmas, sampler=s.sampler, guidance=s.guidance, seed=s.seed, preview_every=s.preview_every,
                   job_id="generate")

    # the job with conditioning of the encoders' shapes: checked now, before the workers start
    placeholder = random_cond(arch, hw=(s.height, s.width))
    if not arch.size_cond:
        placeholder.image_meta_size = None
    preflight(s, job(placeholder, placeholder), arch)
    prepare_out(s)
    if not math.isclose(md.vae_scaling, text_vae.SDXL_SCALE_FACTOR, rel_tol=1e-6):
        say(f"warning: vae/ scaling_factor is {md.vae_scaling}, HunyuanDiT's is {text_vae.SDXL_SCALE_FACTOR}; "
            f"decoding with the VAE's own factor")
    params = param_count(arch)
    print_settings("xDiT HunyuanDiT generate", s, hw, arch.patch_size, [
        ("model", [f"{root} ({describe_model(arch, params)})"]),
        ("text", [f"BERT {arch.text_len} + mT5 {arch.text_len_t5} tokens on {text_device}"
                  f"{', image_meta_size from the size' if arch.size_cond else ''}"]),
        ("prompt", [f"{args.prompt!r}" + (f", negative {args.negative!r}" if args.negative else "")])])

    def body() -> int:
        from PIL import Image

        session = PoolSession(s.pool, s.plan, verbose=args.verbose)
        try:
            session.start(background=True)        # workers start while the text is encoded
            if not args.verbose:
                text_vae.quiet_libraries()
            t0 = time.perf_counter()
            with model_dir_words(root):
                pos, neg = text_vae.encode_prompts(root, args.prompt, args.negative, arch, (s.height, s.width),
                                                   text_device, warn=lambda text: say(f"warning: {text}"))
            say(f"text encoded in {time.perf_counter() - t0:.2f} s")
            result = session.run(job(pos, neg), on_preview=preview_writer(s))
        finally:
            session.close()
        t0 = time.perf_counter()
        with model_dir_words(root):
            image = text_vae.decode_latent(root, result.latent, text_device)
        say(f"decoded with the VAE in {time.perf_counter() - t0:.2f} s")
        image_path = s.out / "image.png"
        Image.fromarray(image).save(image_path)
        model_info = {"source": str(root.resolve()), "params": params, "config": arch.to_dict(),
                      "prompt": args.prompt, "negative": args.negative}
        write_outputs(s, result, model_info,
                      extra={"image": (image_path, f"{image.shape[1]}x{image.shape[0]} image")})
        return EXIT_OK

    return run_guarded(body)
