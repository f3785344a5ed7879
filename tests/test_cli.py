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
from comfyui_xdit_hunyuan.cli import session
from comfyui_xdit_hunyuan.model.loading import save_checkpoint
from comfyui_xdit_hunyuan.preview import SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS, latent_to_rgb
from comfyui_xdit_hunyuan.tiny import random_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--steps", "2", "--size", "64x48", "--seed", "11"]
RUNS = {
    "serial": ["--devices", "cpu:1", *TINY],
    "cfg2": ["--devices", "cpu:2", "--cfg-degree", "2", *TINY],
    # the same random weights, saved as a bare safetensors and loaded with --ckpt, on Ulysses 2
    "ckpt_ulysses2": ["--devices", "cpu:2", "--ulysses-degree", "2", "--steps", "2", "--size", "64x48", "--seed", "11"],
    # approximate: 1 warm-up step of 2
    "pp2": ["--devices", "cpu:2", "--pipefusion-degree", "2", *TINY],
}


def demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "comfyui_xdit_hunyuan", "demo", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo runs, started together (their imports and worker start-ups overlap)."""
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


def test_demo_says_a_pipefusion_result_is_approximate_with_its_measured_deviation(runs):
    code, out, err, folder = runs["pp2"]
    assert code == 0, out + err
    assert "pipefusion 2 (2 patches, warmup 1)  [manual; world size 2]" in out
    text = " ".join(out.split())                 # the result row is wrapped
    assert "result approximate: PipeFusion reuses one-step-old K/V of the other patches after 1 warm-up step" in text
    assert "--warmup-steps 2 = --steps is exact" in text
    # the measured figures and where they were measured (README, Correctness / Performance)
    for words in ("3.0-3.1e-2 at 50 steps 1024x1024", "0.15 at 10 steps 2048x2048", "2 x H100, bf16",
                  "0.088 euler / 0.029 heun at 20 steps", "tiny random model, CPU: the tests assert < 0.2"):
        assert words in text, words
    record = json.loads((folder / "run.json").read_text())
    assert record["exact"] is False and record["exactness"].startswith("approximate: PipeFusion")
    for name in ("serial", "cfg2", "ckpt_ulysses2"):
        assert "  result     exact: " in runs[name][1], name
        assert json.loads((runs[name][3] / "run.json").read_text())["exact"] is True
    assert json.loads((runs["serial"][3] / "run.json").read_text())["pool"]["compile"] is False   # the node's default


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
    monkeypatch.setattr(session, "pool_module", refuse)


@pytest.mark.parametrize("args, words", [
    (["--devices", "cpu:3", "--ulysses-degree", "3"],
     ["--ulysses-degree 3 does not divide", "use one of [1, 2, 4, 8, 16]"]),
    (["--devices", "cuda:9"], ["cuda:9 does not exist", "cpu:N"]),
    (["--steps", "0"], ["--steps 0", "at least 1 step"]),
    (["--sampler", "bogus"], ["invalid choice: 'bogus'", "euler_ancestral"]),
    (["--scheduler", "bogus"], ["invalid choice: 'bogus'", "karras"]),
    (["--devices", "cpu:1", "--cfg-degree", "2"], ["multiply to 2", "--devices 'cpu:1' gives 1", "--strategy auto"]),
    (["--devices", "cpu:2", "--strategy", "auto", "--cfg-degree", "2"], ["drop --cfg-degree", "--strategy manual"]),
    (["--size", "100"], ["multiple of 8", "use e.g. 96"]),
    (["--size", "big"], ["WIDTHxHEIGHT"]),
    (["--devices", "cpu:2", "--pipefusion-degree", "2", "--warmup-steps", "5", "--steps", "2"],
     ["--warmup-steps 5", "at most 2"]),
    (["--ckpt", "does/not/exist.safetensors"], ["does not exist"]),
    (["--ckpt", "x.safetensors", "--preset", "tiny"], ["drop them when loading --ckpt"]),
])
def test_bad_options_exit_2_before_any_worker(args, words, capsys, no_pool, tmp_path):
    code, err = run_in_process(["demo", "--preset", "tiny", *args, "--out", str(tmp_path)]
                               if "--ckpt" not in args else ["demo", *args, "--out", str(tmp_path)], capsys)
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    for name in ENGINE_NAMES:
        assert name not in err, f"the engine's name {name!r} in {err!r}"


# the engine's input names that are not also words of this command line
ENGINE_NAMES = {name for name in cli.OPTION_NAMES if "_" in name}


@pytest.mark.parametrize("args, words", [
    (["--devices", "cpu:2", "--pipefusion-degree", "2", "--num-pipeline-patch", "1"],
     ["--num-pipeline-patch 1 is smaller than --pipefusion-degree 2"]),
    (["--devices", "cpu:2", "--pipefusion-degree", "2", "--warmup-steps", "0"], ["--warmup-steps must be >= 1"]),
    (["--devices", "cpu:3", "--cfg-degree", "3"], ["--cfg-degree must be 1 or 2"]),
    (["--devices", "cpu:2", "--ring-degree", "0", "--cfg-degree", "2"], ["--ring-degree must be a whole number >= 1"]),
    (["--devices", "cpu:8", "--pipefusion-degree", "8"], ["--pipefusion-degree 8 is too large for 8 blocks"]),
    (["--devices", "cpu:4", "--ulysses-degree", "4", "--size", "16"], ["lower --ulysses-degree / --ring-degree"]),
    (["--cfg", "nan"], ["--cfg nan: use a finite guidance scale"]),
    (["--scheduler", "kl_optimal", "--steps", "1"], ["--scheduler kl_optimal with --steps 1", "at least 2 steps"]),
    # the flags of earlier versions name their replacements
    (["--guidance", "4"], ["argument --guidance: renamed to --cfg", "the CFG-parallel degree", "--cfg-degree"]),
    (["--ulysses", "2"], ["argument --ulysses: renamed to --ulysses-degree"]),
    (["--ring", "2"], ["argument --ring: renamed to --ring-degree"]),
    (["--pipefusion", "2"], ["argument --pipefusion: renamed to --pipefusion-degree"]),
    (["--patches", "2"], ["argument --patches: renamed to --num-pipeline-patch"]),
    (["--warmup", "2"], ["argument --warmup: renamed to --warmup-steps"]),
    (["--warmup-step", "2"], ["unrecognized arguments: --warmup-step"]),          # no abbreviations
])
def test_engine_errors_and_old_flags_name_this_command_lines_flags(args, words, capsys, no_pool, tmp_path):
    code, err = run_in_process(["demo", "--preset", "tiny", *args, "--out", str(tmp_path)], capsys)
    assert code == 2, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    for name in ENGINE_NAMES:
        assert name not in err, f"the engine's name {name!r} in {err!r}"


class Stop(Exception):
    """Raised where the workers would start: the command has printed its configuration."""


def configuration(argv: list[str], capsys, monkeypatch) -> str:
    """What a command prints before its workers start."""
    def stop():
        raise Stop
    monkeypatch.setattr(session, "pool_module", stop)
    with pytest.raises(Stop):
        cli.main(argv)
    return capsys.readouterr().out


def test_plan_warnings_and_the_exact_pipefusion_plan_in_flags(capsys, monkeypatch, tmp_path):
    out = configuration(["demo", "--preset", "tiny", "--devices", "cpu:2", "--cfg-degree", "2", "--cfg", "1",
                         "--steps", "2", "--out", str(tmp_path)], capsys, monkeypatch)
    assert "warning: --cfg is 1.0, so there is no negative-prompt pass: with --cfg-degree 2" in out
    assert "set --cfg-degree 1" in out and "guidance 1.0" in out
    out = configuration(["demo", "--preset", "tiny", "--devices", "cpu:2", "--pipefusion-degree", "2",
                         "--warmup-steps", "2", "--steps", "2", "--size", "64", "--out", str(tmp_path)],
                        capsys, monkeypatch)
    assert "  result     exact: --warmup-steps 2 = --steps, every step runs synchronously" in out
    assert "approximate" not in out
    assert "warning: --warmup-steps 2 == --steps 2: every step runs synchronously" in out
    for name in ENGINE_NAMES:
        assert name not in out, name
    out = configuration(["demo", "--preset", "tiny", "--devices", "cpu:1", "--no-compile", "--steps", "2",
                         "--size", "64", "--out", str(tmp_path)], capsys, monkeypatch)
    assert "eager (--no-compile)" in out and "result     exact: the serial run" in out


def test_job_errors_about_an_input_carry_its_field():
    from comfyui_xdit_hunyuan.checks import validate_job
    from comfyui_xdit_hunyuan.job import Job, JobError, WeightsRef
    from comfyui_xdit_hunyuan.plan import ParallelConfig
    from comfyui_xdit_hunyuan.tiny import preset, random_cond

    arch = preset("tiny")
    latent = torch.zeros(1, 4, 8, 8)
    good = dict(weights=WeightsRef("x", "random:0:tiny"), positive=[random_cond(arch, 1)],
                negative=[random_cond(arch, 2)], latent=latent, noise=latent, sigmas=torch.tensor([1.0, 0.0]))
    plan = ParallelConfig("manual")
    for change, words in (({"guidance": float("nan")}, "--cfg nan is not a finite number"),
                          ({"sampler": "bogus"}, "--sampler-name 'bogus' is not supported by the workers"),
                          ({"sigmas": torch.tensor([1.0])}, "use --steps >= 1")):
        with pytest.raises(JobError) as e:
            validate_job(Job(**{**good, **change}), plan, arch)
        assert words in cli.in_option_words(e.value), cli.in_option_words(e.value)
        assert str(e.value) == e.value.render()          # the engine's own words


def test_help_shows_the_node_input_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--cfg-degree N", "--ulysses-degree N", "--ring-degree N", "--pipefusion-degree N",
                 "--num-pipeline-patch N", "--warmup-steps N", "--compile, --no-compile", "--cfg SCALE",
                 "--sampler-name NAME, --sampler NAME", "--scheduler NAME", "--seed SEED", "--steps N"):
        assert flag in out, flag
    for old in ("--guidance", "--ulysses N", "--ring N", "--pipefusion N", "--patches", "--warmup N"):
        assert old not in out, old


def test_docstring_examples():
    import doctest

    from comfyui_xdit_hunyuan import job
    from comfyui_xdit_hunyuan.cli import exactness, usage
    for module in (usage, exactness, job):
        failed, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert tried and not failed, module.__name__


def test_bad_option_from_the_command_line(tmp_path):
    p = demo("--preset", "tiny", "--devices", "cpu:3", "--ulysses-degree", "3", "--out", str(tmp_path / "o"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "error: --ulysses-degree 3 does not divide the model's 16 attention heads" in err
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
                        "--cfg-degree", "2", *TINY, "--out", "out"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "out" / "latent.safetensors").is_file() and (work / "out" / "run.json").is_file()
    assert (work / "out" / "preview.png").is_file()
