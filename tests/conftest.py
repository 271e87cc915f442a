"""Shared fixtures: checkpoints are generated once per test session into a temporary folder, never committed."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_report_header(config):
    """Which int8 kernels this run's figures came from (edge/cpu.py): they differ between CPUs of the same kind."""
    from edge.cpu import cpu_line

    return f"cpu: {cpu_line()}"


LLAMA_TINY = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(naturelm_dir, llama_dir) of the seeded tiny preset."""
    from export.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory) -> Path:
    """A bundle holding the tiny preset's audio encoder in fp32, fp16 and int8, exported and verified once per session.
    Read-only: a test that alters a bundle works on a copy (shutil.copytree)."""
    from export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_bundle(tiny_model[0], out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llm_bundle(tiny_model, tmp_path_factory) -> Path:
    """A bundle holding the tiny preset's LLM, LoRA merged at merging_alpha 1.0, as Q4_K_M (the default), Q8_0, F16
    and F32, with quality reports. Built once per session; read-only (copy it to alter it).

    Tiny models run llama.cpp on one thread (tests pass n_threads=1 too): the work per op is microseconds, and with
    more threads than free cores (a shared CI machine) each op's thread barrier can cost a scheduler tick, making a
    millisecond decode take a second."""
    from quantize.build import build_llm_bundle

    naturelm_dir, llama_dir = tiny_model
    out = tmp_path_factory.mktemp("tiny_llm") / "bundle"
    build_llm_bundle(naturelm_dir, llama_dir, out, types=("Q4_K_M", "Q8_0", "F16", "F32"), lora_mode="merge",
                     merging_alpha=1.0, quality_clips=1, threads=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llm_adapter_bundle(tiny_model, tmp_path_factory) -> Path:
    """The tiny LLM as an F32 base + a LoRA adapter GGUF (default runtime scale 1.0), no quality report."""
    from quantize.build import build_llm_bundle

    naturelm_dir, llama_dir = tiny_model
    out = tmp_path_factory.mktemp("tiny_llm_adapter") / "bundle"
    build_llm_bundle(naturelm_dir, llama_dir, out, types=("F32",), lora_mode="adapter", merging_alpha=1.0,
                     quality=False, threads=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_reference_llm(tiny_model):
    """The PyTorch oracle (export/reference_llm.py) on the tiny preset's weights, LoRA merged at 1.0."""
    from export.checkpoint import open_checkpoint
    from export.reference_llm import ReferenceLLM

    naturelm_dir, llama_dir = tiny_model
    ckpt = open_checkpoint(naturelm_dir)
    return ReferenceLLM(llama_dir, ckpt.lora(), ckpt.config.lora_alpha, ckpt.config.lora_rank, merging_alpha=1.0)


# --- field daemon (issue 6): a real mosquitto per test ------------------------------------------------------------


@pytest.fixture
def mqtt_broker(tmp_path):
    """A running mosquitto on a free port (anonymous, persistent sessions); stopped after the test."""
    from mqtt_broker import Broker, have_mosquitto

    if not have_mosquitto():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Broker(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_broker_factory(tmp_path):
    """make(users={name: password}, tls={ca, cert, key}) -> a started Broker; all are stopped after the test."""
    from mqtt_broker import Broker, have_mosquitto

    if not have_mosquitto():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    brokers = []

    def make(users=None, persistence=True, tls=None):
        b = Broker(tmp_path / f"broker{len(brokers)}", users=users, persistence=persistence, tls=tls).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def daemons():
    """start(config, env=None, pythonpath=()) -> the daemon as a subprocess (tests/test_daemon_e2e.py Daemon); every
    one still running is killed after the test."""
    from test_daemon_e2e import Daemon

    started = []

    def start(*args, **kw) -> Daemon:
        started.append(Daemon(*args, **kw))
        return started[-1]

    yield start
    for d in started:
        d.kill()


@pytest.fixture(scope="session")
def tiny_full_bundle(tiny_bundle, tiny_llm_bundle, tmp_path_factory) -> Path:
    """One bundle with both sides of the tiny model (what `naturelm-edge build` makes): the audio encoders of
    tiny_bundle and the LLMs of tiny_llm_bundle, joined with the bundle's own update_manifest. Read-only."""
    import json
    import shutil

    from edge.bundle import update_manifest

    out = tmp_path_factory.mktemp("tiny_full") / "bundle"
    shutil.copytree(tiny_bundle, out)
    llm = json.loads((tiny_llm_bundle / "manifest.json").read_text())
    files = sorted(llm["files"])
    for name in files:
        shutil.copy2(tiny_llm_bundle / name, out / name)
    update_manifest(out, "llm", llm["llm"], files=files, tools=llm.get("tools"), source=llm.get("source"))
    return out


# --- faults (issue 12): a real small file system that fills up or turns read-only -------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, size="1m") -> a directory with a fresh tmpfs of that size mounted on it (tests run as root);
    `remount(path, "ro"|"rw")` switches it. Everything is unmounted after the test."""
    import subprocess

    mounted = []

    def make(name: str = "fs", size: str = "1m") -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                           check=False, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(d)
        return d

    def remount(d: Path, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(d)], check=True, capture_output=True)

    make.remount = remount
    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)

