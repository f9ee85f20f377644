"""Every benchmark runs in its smoke mode (tiny shapes), so an API change that breaks one fails here;
plus the guards of the scripts that need hardware or disk this machine may lack."""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Library modules and tools, not benchmarks: no smoke run.
NOT_BENCHMARKS = {"__init__", "common", "hlo_stats", "mutations"}
SMOKE = ("decode", "prefill", "train_step", "moe_layer", "compile_time", "attention", "distill", "gpu", "rl",
         "miniature_seeds", "serve")


def test_every_benchmark_has_a_smoke_test():
    scripts = {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")}
    assert scripts - NOT_BENCHMARKS == set(SMOKE) | {"convert_memory", "tpu_aot"}


@pytest.mark.parametrize("name", SMOKE)
def test_smoke(name, tmp_path):
    importlib.import_module(f"benchmarks.{name}").main(["--smoke", "--results_dir", str(tmp_path)])
    results = json.load(open(tmp_path / f"{name}.json"))
    assert results["smoke"] is True and "incomplete" not in results
    if name == "gpu":  # its sections report their own failures instead of raising
        assert not [k for k, v in results.items() if isinstance(v, dict) and "error" in v]


def test_a_smoke_run_writes_no_results_unless_told(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    importlib.import_module("benchmarks.compile_time").main(["--smoke"])
    assert not os.listdir(tmp_path)


def test_recording_keeps_what_was_measured_before_a_failure(tmp_path):
    args = SimpleNamespace(smoke=False, results_dir=str(tmp_path))
    with pytest.raises(ZeroDivisionError):
        with common.recording("partial", args) as results:
            results["first_section"] = 1.5
            results["second_section"] = 1 / 0
    written = json.load(open(tmp_path / "partial.json"))
    assert written["first_section"] == 1.5 and "second_section" not in written
    assert written["incomplete"] == "ZeroDivisionError: division by zero"


def test_convert_memory_smoke(tmp_path):
    importlib.import_module("benchmarks.convert_memory").main(["--smoke", "--dir", str(tmp_path / "scratch")])
    assert not (tmp_path / "scratch").exists()  # cleaned up


def test_convert_memory_checks_free_space_before_writing(tmp_path, monkeypatch):
    convert_memory = importlib.import_module("benchmarks.convert_memory")
    monkeypatch.setattr(convert_memory.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(SystemExit, match=r"has 1\.0 GB free; this run writes up to 41\.1 GB .* pass --dir"):
        convert_memory.main(["--dir", str(tmp_path / "scratch")])
    assert not (tmp_path / "scratch").exists()


def test_tpu_aot_without_libtpu_names_what_to_install(monkeypatch):
    tpu_aot = importlib.import_module("benchmarks.tpu_aot")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"^benchmarks.tpu_aot compiles through libtpu, which is not installed: "
                                         r"pip install 'jax\[tpu\]==") as e:
        tpu_aot.main([])
    assert "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="compiles through libtpu")
def test_tpu_aot_smoke():
    importlib.import_module("benchmarks.tpu_aot").main(["--smoke"])


def test_gpu_sh_without_a_gpu_installs_and_runs_nothing(tmp_path):
    """nvidia-smi fails: the script stops before pip or python run (both replaced by recorders)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, rc in (("nvidia-smi", 9), ("pip", 0), ("python3", 0), ("python", 0)):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/ran\nexit {rc}\n")
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "no NVIDIA GPU found" in proc.stderr and "nothing installed" in proc.stderr
    assert open(tmp_path / "ran").read().split() == ["nvidia-smi"]
