"""`python -m comfyui_xdit_hunyuan demo` through the real worker pool (CPU, gloo), its outputs, and its
rejection of bad options (exit code 2, a message naming the fix, no worker started)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from comfyui_xdit_hunyuan import cli
from comfyui_xdit_hunyuan.model.loading import save_checkpoint
from comfyui_xdit_hunyuan.preview import SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS, latent_to_rgb
from comfyui_xdit_hunyuan.tiny import random_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--steps", "2", "--size", "64x48", "--seed", "11"]
RUNS = {
    "serial": ["--devices", "cpu:1", *TINY],
    "cfg2": ["--devices", "cpu:2", "--cfg", "2", *TINY],
    # the same random weights, saved as a bare safetensors and loaded with --ckpt, on Ulysses 2
    "ckpt_ulysses2": ["--devices", "cpu:2", "--ulysses", "2", "--steps", "2", "--size", "64x48", "--seed", "11"],
}


def demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "comfyui_xdit_hunyuan", "demo", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three demo runs, started together (their imports and worker start-ups overlap)."""
    base = tmp_path_factory.mktemp("demo")
    ckpt = save_checkpoint(random_model("tiny", seed=0), base / "tiny.safetensors", "bare")
    procs = {}
    for name, args in RUNS.items():
        extra = ["--ckpt", str(ckpt)] if name.startswith("ckpt") else []
        procs[name] = demo(*args, *extra, "--out", str(base / name))
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err, base / name)
    return results


def load_latent(folder: Path) -> torch.Tensor:
    with safe_open(str(folder / "latent.safetensors"), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}   # ComfyUI SaveLatent keys
        assert "xdit_hunyuan" in f.metadata()
        return f.get_tensor("latent_tensor")


@pytest.mark.parametrize("name", list(RUNS))
def test_demo_runs_and_writes_its_files(runs, name):
    code, out, err, folder = runs[name]
    assert code == 0, out + err
    assert "step 1/2" in out and "step 2/2" in out and "sampling time:" in out
    assert "workers ready" in out
    for f in ("latent.safetensors", "preview.png", "run.json"):
        assert (folder / f).is_file(), f
    latent = load_latent(folder)
    assert latent.shape == (1, 4, 6, 8) and torch.isfinite(latent).all()
    record = json.loads((folder / "run.json").read_text())
    assert record["steps"] == 2 and record["size"] == {"width": 64, "height": 48}
    assert len(record["timings"]["step_s"]) == 2
    from PIL import Image
    with Image.open(folder / "preview.png") as im:
        assert im.size == (8, 6)


def test_demo_prints_the_resolved_config(runs):
    out = runs["cfg2"][1]
    assert "2 CPU worker processes" in out and "cfg 2  [manual; world size 2]" in out
    assert "dtype      fp32" in out and "preset 'tiny'" in out and "8 blocks, hidden 128" in out
    assert "64x48 pixels -> latent 8x6" in out and "2 steps, euler / normal, guidance 5.0, seed 11" in out
    assert "ulysses 2" in runs["ckpt_ulysses2"][1] and "tiny.safetensors" in runs["ckpt_ulysses2"][1]


def test_parallel_runs_equal_the_serial_run(runs):
    ref = load_latent(runs["serial"][3])
    for name in ("cfg2", "ckpt_ulysses2"):
        other = load_latent(runs[name][3])
        rel = ((other - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, f"{name}: relative difference {rel:.2e} from the serial run"


# ---------------------------------------------------------------------- bad options
def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:               # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_pool(monkeypatch):
    def refuse():
        raise AssertionError("a worker pool was requested although the options are bad")
    monkeypatch.setattr(cli, "pool_module", refuse)


@pytest.mark.parametrize("args, words", [
    (["--devices", "cpu:3", "--ulysses", "3"], ["--ulysses 3 does not divide", "use one of [1, 2, 4, 8, 16]"]),
    (["--devices", "cuda:9"], ["cuda:9 does not exist", "cpu:N"]),
    (["--steps", "0"], ["--steps 0", "at least 1 step"]),
    (["--sampler", "bogus"], ["invalid choice: 'bogus'", "euler_ancestral"]),
    (["--scheduler", "bogus"], ["invalid choice: 'bogus'", "karras"]),
    (["--devices", "cpu:1", "--cfg", "2"], ["multiply to 2", "--devices 'cpu:1' gives 1", "--strategy auto"]),
    (["--devices", "cpu:2", "--strategy", "auto", "--cfg", "2"], ["drop --cfg", "--strategy manual"]),
    (["--size", "100"], ["multiple of 8", "use e.g. 96"]),
    (["--size", "big"], ["WIDTHxHEIGHT"]),
    (["--devices", "cpu:2", "--pipefusion", "2", "--warmup", "5", "--steps", "2"], ["--warmup 5", "at most 2"]),
    (["--ckpt", "does/not/exist.safetensors"], ["does not exist"]),
    (["--ckpt", "x.safetensors", "--preset", "tiny"], ["drop them when loading --ckpt"]),
])
def test_bad_options_exit_2_before_any_worker(args, words, capsys, no_pool, tmp_path):
    code, err = run_in_process(["demo", "--preset", "tiny", *args, "--out", str(tmp_path)]
                               if "--ckpt" not in args else ["demo", *args, "--out", str(tmp_path)], capsys)
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_bad_option_from_the_command_line(tmp_path):
    p = demo("--preset", "tiny", "--devices", "cpu:3", "--ulysses", "3", "--out", str(tmp_path / "o"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "error: --ulysses 3 does not divide the model's 16 attention heads" in err
    assert "starting" not in out and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- the preview
def test_preview_uses_the_sdxl_latent_rgb_factors():
    factors, bias = np.array(SDXL_LATENT_RGB_FACTORS), np.array(SDXL_LATENT_RGB_BIAS)
    latent = torch.zeros(1, 4, 2, 3)
    latent[0, 1, 0, 0] = 2.0          # sampler space: channel 1 = 2 at pixel (0, 0)
    latent[0, 3, 1, 2] = -1.5         # channel 3 = -1.5 at pixel (1, 2)
    rgb = latent_to_rgb(latent, scaled=True)
    expect = np.empty((2, 3, 3))
    for y in range(2):
        for x in range(3):
            v = latent[0, :, y, x].numpy() @ factors + bias
            expect[y, x] = np.floor(np.clip((v + 1) / 2, 0, 1) * 255)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert np.abs(rgb.astype(int) - expect.astype(int)).max() <= 1
    # a LATENT's samples (VAE space) are first multiplied by the SDXL scale factor 0.13025
    assert np.abs(latent_to_rgb(latent / 0.13025).astype(int) - rgb.astype(int)).max() <= 1


def test_pip_install_into_an_empty_folder_runs_the_demo_from_another_directory(tmp_path):
    """The wheel holds the whole pack, the worker pool included (as comfyui_xdit_hunyuan.worker): installed
    into an empty folder, the demo runs from elsewhere with nothing of the clone on its path."""
    site, work = tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, timeout=300, capture_output=True)
    assert (site / "comfyui_xdit_hunyuan" / "worker" / "main.py").is_file()
    assert not (site / "worker").exists()                    # no top-level `worker` to clash with others'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-P", "-c", "import comfyui_xdit_hunyuan.worker.client as c; "
                            "print(c.__file__)"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    p = subprocess.run([sys.executable, "-P", "-m", "comfyui_xdit_hunyuan", "demo", "--devices", "cpu:2",
                        "--cfg", "2", *TINY, "--out", "out"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "out" / "latent.safetensors").is_file() and (work / "out" / "run.json").is_file()
    assert (work / "out" / "preview.png").is_file()
