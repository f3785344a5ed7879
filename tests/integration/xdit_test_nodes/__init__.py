"""Test-only ComfyUI nodes, copied into a temporary custom_nodes/ by the integration test (never
shipped): HunyuanDiT-shaped CONDITIONING and a random LATENT from a seed, so a ComfyUI server can run
HunyuanDiT workflows without the multi-GB text encoders and VAE."""
import torch


class XDiTTestHunyuanConditioning:
    """What CLIPTextEncode returns with HunyuanDiT's BERT + mT5 encoders, filled from a seed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
            "bert_tokens": ("INT", {"default": 77, "min": 1, "max": 1024}),
            "mt5_tokens": ("INT", {"default": 256, "min": 1, "max": 1024}),
            "used": ("FLOAT", {"default": 0.3, "min": 0.01, "max": 1.0}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/xDiT"

    def make(self, seed, bert_tokens, mt5_tokens, used):
        g = torch.Generator().manual_seed(seed)
        mb = torch.zeros(1, bert_tokens, dtype=torch.long)
        mb[:, : max(1, int(bert_tokens * used))] = 1
        mt = torch.zeros(1, mt5_tokens, dtype=torch.long)
        mt[:, : max(1, int(mt5_tokens * used))] = 1
        cond = torch.randn(1, bert_tokens, 1024, generator=g)
        extras = {"pooled_output": torch.randn(1, 1024, generator=g), "attention_mask": mb,
                  "conditioning_mt5xl": torch.randn(1, mt5_tokens, 2048, generator=g), "attention_mask_mt5xl": mt}
        return ([[cond, extras]],)


class XDiTTestLatent:
    """A non-empty LATENT (an 'encoded image') for image-to-image runs with denoise < 1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
            "width": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 8}),
            "height": ("INT", {"default": 64, "min": 16, "max": 4096, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing/xDiT"

    def make(self, seed, width, height, batch_size):
        g = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(batch_size, 4, height // 8, width // 8, generator=g) * 5.0},)


NODE_CLASS_MAPPINGS = {"XDiTTestHunyuanConditioning": XDiTTestHunyuanConditioning, "XDiTTestLatent": XDiTTestLatent}
