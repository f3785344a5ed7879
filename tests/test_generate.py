"""`python -m comfyui_xdit_hunyuan generate` on a tiny random diffusers-format HunyuanDiT directory that
the test writes: tiny BERT and mT5 encoders whose widths match the "tiny" preset, tokenizer files,
a tiny AutoencoderKL and our transformer saved in the diffusers layout.

Oracle: the image is recomputed here without the command line or the pool -- the text encoded with
transformers following the diffusers HunyuanDiT pipeline, our model called serially in the sampling
loop, the latent decoded with the VAE -- and must match the PNG to within one grey level."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")

from comfyui_xdit_hunyuan import cli, sampling, text_vae  # noqa: E402
from comfyui_xdit_hunyuan.cli import session  # noqa: E402
from comfyui_xdit_hunyuan.model.loading import load_model, save_checkpoint  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset, random_model  # noqa: E402

WORDS = "a an the photo of cat dog red blue green on mat in snow fox small big".split()
PROMPT, NEGATIVE = "a photo of a red fox in the snow", "blue"
SIZE, STEPS, SEED, GUIDANCE = 64, 2, 7, 4.0


def write_model_dir(root: Path, preset_name: str = "tiny", seed: int = 3) -> Path:
    """A diffusers HunyuanDiT directory with tiny random parts whose widths fit `preset_name`."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, MT5Config, MT5EncoderModel

    cfg = preset(preset_name)
    torch.manual_seed(seed)
    save_checkpoint(random_model(preset_name, seed=seed), root / "transformer", "diffusers")

    bert_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(bert_vocab) + "\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    BertModel(BertConfig(vocab_size=len(bert_vocab), hidden_size=cfg.text_dim, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=2 * cfg.text_dim, max_position_embeddings=64)
              ).save_pretrained(root / "text_encoder")

    t5_vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(t5_vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    (root / "tokenizer_2").mkdir()
    tok.save(str(root / "tokenizer_2" / "tokenizer.json"))
    (root / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 512}))
    MT5EncoderModel(MT5Config(vocab_size=len(t5_vocab), d_model=cfg.text_dim_t5, d_kv=16, d_ff=64, num_layers=1,
                              num_heads=4, relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder_2")

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=SIZE, scaling_factor=0.13025
                  ).save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("hunyuan") / "HunyuanDiT-tiny-Diffusers")


def generate(model_dir: Path, out: Path, capsys) -> tuple[int, str]:
    """The command, in this process (transformers and diffusers are imported once for the module)."""
    code = cli.main(["generate", "--model-dir", str(model_dir), "--prompt", PROMPT, "--negative", NEGATIVE,
                     "--devices", "cpu:1", "--steps", str(STEPS), "--size", str(SIZE), "--seed", str(SEED),
                     "--cfg", str(GUIDANCE), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def encode(model_dir: Path, text: str, cfg) -> dict:
    """The text conditioning as the diffusers HunyuanDiT pipeline computes it (its encode_prompt)."""
    from transformers import AutoTokenizer, BertModel, MT5EncoderModel

    out = {}
    for tok, enc, cls, n, key in (("tokenizer", "text_encoder", BertModel, cfg.text_len, ""),
                                  ("tokenizer_2", "text_encoder_2", MT5EncoderModel, cfg.text_len_t5, "_t5")):
        ids = AutoTokenizer.from_pretrained(model_dir / tok)(
            text, padding="max_length", max_length=n, truncation=True, return_attention_mask=True,
            return_tensors="pt")
        model = cls.from_pretrained(model_dir / enc).float().eval()
        with torch.no_grad():
            states = model(ids.input_ids, attention_mask=ids.attention_mask)[0]
        out["context" if not key else "encoder_hidden_states_t5"] = states
        out["text_embedding_mask" + key] = ids.attention_mask
    return out


def reference_image(model_dir: Path) -> np.ndarray:
    from diffusers import AutoencoderKL

    model = load_model(model_dir / "transformer", dtype=torch.float32)
    cfg = model.cfg
    pos, neg = encode(model_dir, PROMPT, cfg), encode(model_dir, NEGATIVE, cfg)
    ms = sampling.DiscreteVSampling.for_model(cfg)
    sigmas = sampling.sigmas_for_denoise(ms, "normal", STEPS, 1.0)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    x = sampling.initial_latent(ms, sigmas, sampling.prepare_noise(latent, SEED), latent)

    def denoise(x, sigma):
        cond = ms.denoise(lambda xi, t: model(xi, t, **pos), x, sigma)
        uncond = ms.denoise(lambda xi, t: model(xi, t, **neg), x, sigma)
        return sampling.cfg_combine(cond, uncond, GUIDANCE)

    with torch.no_grad():
        x = sampling.sample(denoise, x, sigmas, "euler")
        vae = AutoencoderKL.from_pretrained(model_dir / "vae").float().eval()
        img = vae.decode(x / vae.config.scaling_factor).sample
    img = (img[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (img * 255).round().astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_the_image_the_model_gives_deterministically(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # for the worker processes
    runs = [generate(model_dir, tmp_path / name, capsys) for name in ("a", "b")]
    for code, output in runs:
        assert code == 0, output
    out = runs[0][1]
    assert "BERT 7 + mT5 9 tokens" in out and "step 2/2" in out and "image.png" in out
    a, b = read_png(tmp_path / "a" / "image.png"), read_png(tmp_path / "b" / "image.png")
    assert a.shape == (SIZE, SIZE, 3)
    assert np.array_equal(a, b), "the same seed must give the same image"
    assert (tmp_path / "a" / "latent.safetensors").is_file() and (tmp_path / "a" / "preview.png").is_file()
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["model"]["prompt"] == PROMPT and record["steps"] == STEPS and record["seed"] == SEED

    expected = reference_image(model_dir)
    diff = np.abs(a.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"image differs from the serial reference by up to {diff.max()} levels"
    assert a.std() > 0          # not a constant image


def test_encode_prompts_follows_the_pipeline(model_dir):
    cfg = preset("tiny")
    pos, neg = text_vae.encode_prompts(model_dir, PROMPT, NEGATIVE, cfg, (SIZE, SIZE), "cpu")
    ref = encode(model_dir, PROMPT, cfg)
    for key, want in ref.items():
        assert torch.equal(getattr(pos, key), want), key
    assert pos.context.shape == (1, cfg.text_len, cfg.text_dim)
    assert pos.encoder_hidden_states_t5.shape == (1, cfg.text_len_t5, cfg.text_dim_t5)
    # padding is masked: the negative prompt is one word (+ BERT's [CLS]/[SEP], mT5's </s>)
    assert neg.text_embedding_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0]]
    assert neg.text_embedding_mask_t5.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert pos.image_meta_size is None                 # v1.2 has no size conditioning


def test_size_conditioned_model_gets_image_meta_size(model_dir):
    cfg = preset("tiny-v1.1")
    pos, neg = text_vae.encode_prompts(model_dir, PROMPT, "", cfg, (48, 64), "cpu")
    for entry in (pos, neg):
        assert entry.image_meta_size.tolist() == [[48.0, 64.0, 48.0, 64.0, 0.0, 0.0]]


def test_bad_model_dirs_are_rejected_before_workers_start(model_dir, tmp_path, capsys, monkeypatch):
    def no_pool():
        raise AssertionError("a worker pool was requested for a bad input")
    monkeypatch.setattr(session, "pool_module", no_pool)

    def run(*args):
        code = cli.main(["generate", "--prompt", "x", "--devices", "cpu:1", "--out", str(tmp_path / "o"), *args])
        return code, capsys.readouterr().err

    code, err = run("--model-dir", str(tmp_path / "nope"))
    assert code == 2 and "no such folder" in err
    partial = tmp_path / "partial"
    (partial / "transformer").mkdir(parents=True)
    code, err = run("--model-dir", str(partial))
    assert code == 2 and "lacks text_encoder/" in err and "vae/" in err
    code, err = run("--model-dir", str(model_dir), "--size", "60")
    assert code == 2 and "multiple of 8" in err


def test_a_damaged_part_is_named_with_what_to_do(model_dir, tmp_path, capsys, monkeypatch):
    """A part that fails to load once the workers have started: exit 2 naming the part, the pool closed."""
    import shutil

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    code = cli.main(["generate", "--model-dir", str(broken), "--prompt", "x", "--devices", "cpu:1", "--steps", "1",
                     "--size", str(SIZE), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--model-dir {broken}: {broken / 'text_encoder'}: the BERT text encoder cannot be loaded" in err
    assert "re-download it" in err
