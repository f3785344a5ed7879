"""The text encoders and the VAE of a diffusers-format HunyuanDiT directory, run as the diffusers
HunyuanDiT pipeline runs them (transformers' BERT and mT5, diffusers' AutoencoderKL); the transformer is
ours, sampled on the worker pool (`python -m comfyui_xdit_hunyuan generate`). transformers and diffusers
are imported only by the functions that run them.

    HunyuanDiT-v1.2-Diffusers/
      transformer/      the DiT (read by model.loading)   text_encoder/    BERT    tokenizer/    its tokenizer
      vae/              AutoencoderKL                     text_encoder_2/  mT5     tokenizer_2/  its tokenizer

- `check_model_dir(root)`: the parts present and agreeing on their widths, from config files only;
- `encode_prompts(...)`: (positive, negative) job.CondEntry, the text padded to the model's 77 / 256 tokens;
- `decode_latent(...)`: a LATENT's samples -> uint8 [H, W, 3] image.

A directory that cannot be used raises ModelDirError, whose message names the folder and what to do.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .preview import SDXL_SCALE_FACTOR      # the sampler works on VAE latent x this (SDXL latent format)

PARTS = {"transformer": "the HunyuanDiT transformer", "text_encoder": "the BERT text encoder",
         "text_encoder_2": "the mT5 text encoder", "tokenizer": "the BERT tokenizer",
         "tokenizer_2": "the mT5 tokenizer", "vae": "the VAE"}
log = logging.getLogger(__name__)


class ModelDirError(ValueError):
    """A diffusers HunyuanDiT directory that cannot be used; the message names the folder and the fix."""


@dataclass(frozen=True)
class ModelDir:
    root: Path
    arch: Any                  # model.HunyuanDiTConfig of transformer/
    vae_factor: int            # pixels per latent pixel
    vae_scaling: float         # vae/ config's scaling_factor


def check_model_dir(root: Path) -> ModelDir:
    """Structure, transformer weights and the widths the parts must agree on, from config files only."""
    from .model.loading import inspect_source

    if not root.is_dir():
        raise ModelDirError(f"{root}: no such folder; give the folder of a diffusers-format HunyuanDiT "
                            f"(e.g. HunyuanDiT-v1.2-Diffusers)")
    missing = [f"{name}/ ({what})" for name, what in PARTS.items() if not (root / name).is_dir()]
    if missing:
        raise ModelDirError(f"{root} lacks {', '.join(missing)}; a diffusers HunyuanDiT directory has "
                            f"{', '.join(n + '/' for n in PARTS)}")
    try:
        arch = inspect_source(root / "transformer")
    except ValueError as e:             # not HunyuanDiT, truncated, ...
        raise ModelDirError(str(e)) from e
    bert = _read_json(root / "text_encoder" / "config.json", "the BERT text encoder")
    t5 = _read_json(root / "text_encoder_2" / "config.json", "the mT5 text encoder")
    vae = _read_json(root / "vae" / "config.json", "the VAE")
    for what, got, want in (("text_encoder/ (BERT) hidden_size", bert.get("hidden_size"), arch.text_dim),
                            ("text_encoder_2/ (mT5) d_model", t5.get("d_model"), arch.text_dim_t5),
                            ("vae/ latent_channels", vae.get("latent_channels", 4), arch.in_channels)):
        if got != want:
            raise ModelDirError(f"{root}: {what} is {got} but the transformer expects {want}; the folders come "
                                f"from different models -- use the directory of one HunyuanDiT release")
    vae_factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return ModelDir(root, arch, vae_factor, float(vae.get("scaling_factor", SDXL_SCALE_FACTOR)))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path} is missing: {what} needs its config.json; is this a diffusers HunyuanDiT "
                            f"directory?") from None
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path} cannot be read as JSON ({e}); re-download {what}") from None


def _load(what: str, path: Path, load: Callable[[Path], Any]):
    """load(path), or ModelDirError naming the part that could not be loaded."""
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - any library's error of a damaged part (OSError, SafetensorError ...)
        raise ModelDirError(f"{path}: {what} cannot be loaded ({type(e).__name__}: {e}); re-download it") from e


def quiet_libraries() -> None:
    """transformers / diffusers: errors only, no download or loading progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _text_encoder(path: Path):
    from transformers import AutoConfig, AutoModel, BertModel, MT5EncoderModel, T5EncoderModel

    kind = AutoConfig.from_pretrained(path).model_type
    cls = {"bert": BertModel, "mt5": MT5EncoderModel, "t5": T5EncoderModel}.get(kind, AutoModel)
    return cls.from_pretrained(path)


def encode_prompts(root: Path, prompt: str, negative: str, arch, size_hw: tuple[int, int], device: str, *,
                   warn: Callable[[str], None] | None = None):
    """(positive, negative) CondEntry, encoded as the diffusers HunyuanDiT pipeline does: BERT and mT5 last
    hidden states of the text padded to the model's lengths (77 / 256) with their attention masks.
    v1.0/v1.1 models also get image_meta_size [H, W, H, W, 0, 0] (original = target = the image size).
    warn(text) is told of a prompt longer than a model's token length (it is cut)."""
    import torch
    from transformers import AutoTokenizer

    from .job import CondEntry

    warn = warn or log.warning
    states: dict[str, list] = {}
    for tok_dir, enc_dir, length, width, label in (
            ("tokenizer", "text_encoder", arch.text_len, arch.text_dim, "BERT"),
            ("tokenizer_2", "text_encoder_2", arch.text_len_t5, arch.text_dim_t5, "mT5")):
        tokenizer = _load(f"the {label} tokenizer", root / tok_dir, AutoTokenizer.from_pretrained)
        encoder = _load(f"the {label} text encoder", root / enc_dir, _text_encoder)
        encoder = encoder.to(device=device, dtype=torch.float32).eval()
        out = []
        for text in (prompt, negative):
            full = len(tokenizer(text, truncation=False).input_ids)
            if full > length:
                warn(f"the {'prompt' if text is prompt else 'negative prompt'} has {full} {label} tokens; only the "
                     f"first {length} are used")
            batch = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                              return_attention_mask=True, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))[0]
            if hidden.shape[-1] != width:
                raise ModelDirError(f"{root / enc_dir} gives {hidden.shape[-1]}-wide states but the transformer "
                                    f"expects {width}; use the directory of one HunyuanDiT release")
            out.append((hidden.float().cpu(), batch.attention_mask.cpu()))
        states[label] = out
        del encoder
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    h, w = size_hw
    meta = torch.tensor([[h, w, h, w, 0, 0]], dtype=torch.float32) if arch.size_cond else None
    entries = []
    for i in range(2):
        (ctx, mask), (t5, mask_t5) = states["BERT"][i], states["mT5"][i]
        entries.append(CondEntry(context=ctx, text_embedding_mask=mask, encoder_hidden_states_t5=t5,
                                 text_embedding_mask_t5=mask_t5, image_meta_size=meta))
    return entries[0], entries[1]


def decode_latent(root: Path, samples, device: str):
    """uint8 [H, W, 3] image from a LATENT's samples, with the directory's VAE (as the diffusers pipeline
    decodes: latents / scaling_factor, then [-1, 1] -> [0, 255] rounded)."""
    import torch
    from diffusers import AutoencoderKL

    vae = _load("the VAE", root / "vae", lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32))
    vae = vae.to(device).eval()
    z = samples.to(device=device, dtype=torch.float32) * (SDXL_SCALE_FACTOR / float(vae.config.scaling_factor))
    with torch.no_grad():
        image = vae.decode(z, return_dict=False)[0]
    image = (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    del vae
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return (image * 255).round().astype("uint8")
