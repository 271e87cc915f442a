"""`naturelm-edge doctor [--config FILE] [--bundle DIR]`: is this machine ready to record?

Every check is named and ends as PASS, WARN, FAIL or SKIP (it needs something that was not given, e.g. the broker
check without --config), with the reason on the same line, so that a technician at a recorder (or a fleet script,
with --json) sees what is wrong without reading a log. The command exits 1 when any check fails, else 0.

A check never raises: whatever goes wrong inside one (a missing library, a device that refuses) is its result.
On a Jetson (detected from /etc/nv_tegra_release or the device tree) a missing GPU path is a failure, because there
it means the wrong onnxruntime wheel or a llama-cpp-python built without CUDA; elsewhere it is a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
#: Below these the outbox, clips and the TensorRT engine cache run out within days.
DISK_FAIL_BYTES = 1 << 30
DISK_WARN_BYTES = 5 << 30
MIN_YEAR = 2024
#: Above the model files and the KV cache: CUDA context, TensorRT/onnxruntime and llama.cpp buffers, Python, the ring
#: buffer (docs/jetson.md, "Which bundle fits which board").
RUNTIME_OVERHEAD_BYTES = 1 << 30
BROKER_TIMEOUT_S = 5.0


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<12} {self.detail}"


def _gib(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB up, MiB below (a tiny test bundle is not '0.0 GiB')."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- the machine ----------------------------------------------------------------------------------------------------


def jetson_info() -> str | None:
    """'<board model>, L4T R36.4.0' on a Jetson, else None."""
    release = None
    try:
        first = Path("/etc/nv_tegra_release").read_text(errors="replace").splitlines()[0]
        # "# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
        parts = [p.strip() for p in first.lstrip("# ").split(",")]
        major = parts[0].split()[0]
        rev = next((p.split(":", 1)[1].strip() for p in parts if p.startswith("REVISION")), "")
        release = f"L4T {major}.{rev}" if rev else f"L4T {major}"
    except (OSError, IndexError):
        pass
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        model = ""
    if release is None and "jetson" not in model.lower():
        return None
    return ", ".join(x for x in (model or "NVIDIA Jetson", release) if x)


def check_python() -> Check:
    v = sys.version_info
    text = f"{platform.python_version()} on {platform.machine()} ({platform.system()} {platform.release()})"
    if v < (3, 10):
        return Check("python", FAIL, f"{text}; naturelm-edge needs Python >= 3.10 (JetPack 6 ships 3.10)")
    return Check("python", PASS, f"{text}; needs >= 3.10")


def check_board(jetson: str | None) -> Check:
    if jetson is None:
        return Check("board", PASS, "not a Jetson; the GPU checks below look for a discrete NVIDIA GPU")
    if "L4T R36.4" in jetson:
        return Check("board", PASS, f"{jetson} (JetPack 6.1/6.2)")
    if "L4T R36" in jetson:
        return Check("board", WARN, f"{jetson}: JetPack 6.0 (CUDA 12.2, TensorRT 8.6); the pinned GPU wheels need "
                                    "JetPack 6.1/6.2 (docs/jetson.md, 'JetPack versions')")
    return Check("board", WARN, f"{jetson}: not JetPack 6.1/6.2 (L4T R36.4); the installer refuses it "
                                "(docs/jetson.md, 'JetPack versions')")


#: Where scripts/install-jetson.sh puts the GPU's DeviceAllow lines (edge/jetson_devices.py).
GPU_DROPIN = Path("/etc/systemd/system/naturelm-edge.service.d/50-gpu-devices.conf")


def check_sandbox(jetson: str | None, dropin: Path = GPU_DROPIN, root: Path = Path("/")) -> Check:
    """doctor runs outside the unit's sandbox: what it finds of the GPU, the service finds only if the unit's
    drop-in lets the same device nodes through. Compare the installed drop-in with what this board needs now."""
    if jetson is None:
        return Check("sandbox", PASS, "not a Jetson: the unit's DeviceAllow=char-nvidia* covers a discrete GPU")
    from edge.jetson_devices import build

    plan, _ = build(root)
    if not plan.gpu_nodes:
        return Check("sandbox", FAIL, f"no GPU device nodes under {root / 'dev'}: is the nvgpu driver loaded?")
    if not dropin.is_file():
        return Check("sandbox", FAIL, f"{dropin} is missing: the service cannot open the GPU under DevicePolicy="
                                      "closed; run `naturelm-edge jetson-devices --write "
                                      f"{dropin.parent}` (scripts/install-jetson.sh does)")
    have = {ln.split("=", 1)[1].strip() for ln in dropin.read_text().splitlines() if ln.startswith("DeviceAllow=")}
    missing = [a for a in plan.allow if a not in have]
    if missing:
        return Check("sandbox", FAIL, f"{dropin} lacks {', '.join(missing)} (a JetPack upgrade?); re-run "
                                      "`naturelm-edge jetson-devices --write ...`")
    return Check("sandbox", PASS, f"{dropin}: {len(plan.allow)} DeviceAllow line(s) cover the board's "
                                  f"{len(plan.gpu_nodes)} GPU node(s)")


def check_providers(jetson: str | None, cfg) -> Check:
    try:
        import onnxruntime as ort

        from edge.encoder import PROVIDERS, gpu_name
    except ImportError as e:
        return Check("onnxruntime", FAIL, f"cannot import onnxruntime ({e}); pip install onnxruntime "
                                          "(on Jetson: NVIDIA's onnxruntime-gpu, docs/jetson.md)")
    have = set(ort.get_available_providers())
    flags = ", ".join(f"{short} {'yes' if full in have else 'no'}" for short, full in
                      (("TensorRT", PROVIDERS["tensorrt"]), ("CUDA", PROVIDERS["cuda"]), ("CPU", PROVIDERS["cpu"])))
    text = f"onnxruntime {ort.__version__}: {flags}"
    wanted = cfg.bundle.provider if cfg is not None else "auto"
    if wanted != "auto" and PROVIDERS[wanted] not in have:
        return Check("onnxruntime", FAIL, f"{text}; the config asks for bundle.provider {wanted}, which this build "
                                          "lacks")
    if PROVIDERS["tensorrt"] in have or PROVIDERS["cuda"] in have:
        gpu = gpu_name()
        return Check("onnxruntime", PASS, f"{text}" + (f"; GPU {gpu}" if gpu else ""))
    if jetson is not None:
        return Check("onnxruntime", FAIL, f"{text}: this is the CPU build on a Jetson; install NVIDIA's "
                                          "onnxruntime-gpu wheel (scripts/install-jetson.sh)")
    return Check("onnxruntime", WARN, f"{text}: the audio encoder will run on the CPU")


def check_llama(jetson: str | None, cfg) -> Check:
    try:
        import llama_cpp

        from edge.llm import gpu_offload_supported

        gpu = gpu_offload_supported()
    except Exception as e:  # noqa: BLE001 - a broken native library is this check's result
        return Check("llama.cpp", FAIL, f"cannot load llama-cpp-python ({type(e).__name__}: {e})")
    text = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}: GPU offload {'yes' if gpu else 'no'}"
    layers = cfg.bundle.n_gpu_layers if cfg is not None else None
    if gpu:
        return Check("llama.cpp", PASS, f"{text} (built with CUDA)")
    if layers not in (None, 0):
        return Check("llama.cpp", FAIL, f"{text}; the config asks for bundle.n_gpu_layers {layers}")
    if jetson is not None:
        return Check("llama.cpp", FAIL, f"{text}: built without CUDA; rebuild with CMAKE_ARGS=\"-DGGML_CUDA=on\" "
                                        "(scripts/install-jetson.sh)")
    return Check("llama.cpp", WARN, f"{text}: the LLM will run on the CPU")


def check_microphone(cfg) -> Check:
    from edge.errors import AudioError
    from edge.sources import input_devices, resolve_device

    uses_mic = cfg is not None and cfg.source.type == "mic"
    try:
        devices = input_devices()
    except AudioError as e:
        return Check("microphone", FAIL if uses_mic else WARN, str(e))
    if uses_mic:
        spec = cfg.source.mic.device
        try:
            d = resolve_device(spec)
        except AudioError as e:
            return Check("microphone", FAIL, f"source.mic.device {spec!r}: {e}")
        return Check("microphone", PASS, f"source.mic.device {spec!r} is [{d['index']}] {d['name']} "
                                         f"({d['channels']} ch, {d['samplerate']} Hz)")
    if not devices:
        why = "; the config's source is " + cfg.source.type if cfg is not None else ""
        return Check("microphone", WARN, f"no audio input devices (is one plugged in, and is the user in the 'audio' "
                                         f"group?){why}")
    names = "; ".join(f"[{d['index']}] {d['name']}" for d in devices[:4]) + (" ..." if len(devices) > 4 else "")
    return Check("microphone", PASS, f"{len(devices)} input device(s): {names}")


def check_config(path: str | None):
    from edge.config import load_config
    from edge.errors import NatureLMEdgeError

    if path is None:
        return Check("config", SKIP, "no --config given"), None
    try:
        cfg = load_config(Path(path))
    except NatureLMEdgeError as e:
        return Check("config", FAIL, str(e)), None
    return Check("config", PASS, f"{path}: valid; device {cfg.device_id}, {len(cfg.prompts)} prompt(s), source "
                                 f"{cfg.source.type}"), cfg


def check_broker(cfg) -> Check:
    if cfg is None:
        return Check("broker", SKIP, "needs --config (mqtt.host, port, credentials)")
    import paho.mqtt.client as paho

    from edge.config import read_mqtt_password
    from edge.errors import ConfigError

    m = cfg.mqtt
    where = f"{'mqtts' if m.tls else 'mqtt'}://{m.host}:{m.port}"
    note = ""
    try:
        password = read_mqtt_password(m, str(cfg.path))
    except ConfigError as e:
        if m.password_credential is None:
            return Check("broker", FAIL, str(e))
        password, note = None, (f"; credential {m.password_credential!r} is only readable under systemd, so the "
                                "login was tried without it")
    result: dict = {}
    done = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"naturelm-edge-doctor-{os.getpid()}",
                         clean_session=True, protocol=paho.MQTTv311, reconnect_on_failure=False)
    if m.username:
        client.username_pw_set(m.username, password.reveal() if password else None)
    if m.tls is not None:
        import ssl

        t = m.tls
        client.tls_set(ca_certs=str(t.ca) if t.ca else None, certfile=str(t.cert) if t.cert else None,
                       keyfile=str(t.key) if t.key else None, cert_reqs=ssl.CERT_REQUIRED)
        if t.insecure:
            client.tls_insecure_set(True)

    def on_connect(c, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    t0 = time.monotonic()
    try:
        client.connect(m.host, m.port, keepalive=10)
    except (OSError, ValueError) as e:
        return Check("broker", FAIL, f"{where}: cannot connect ({e})")
    client.loop_start()
    try:
        if not done.wait(BROKER_TIMEOUT_S):
            return Check("broker", FAIL, f"{where}: no answer to CONNECT within {BROKER_TIMEOUT_S:g} s")
        rc = result["rc"]
        if rc.is_failure:
            return Check("broker", FAIL, f"{where} refused the connection: {rc}" + note)
        ms = (time.monotonic() - t0) * 1000
        user = f" as {m.username!r}" if m.username else ""
        return Check("broker", PASS if not note else WARN, f"{where}: connected{user} in {ms:.0f} ms" + note)
    finally:
        client.disconnect()
        client.loop_stop()


def check_bundle(path: Path | None, verify: str):
    if path is None:
        return Check("bundle", SKIP, "needs --bundle or --config (bundle.path)"), None
    from edge.bundle import load_bundle
    from edge.errors import NatureLMEdgeError

    t0 = time.monotonic()
    try:
        bundle = load_bundle(path, verify=verify)
    except NatureLMEdgeError as e:
        return Check("bundle", FAIL, str(e)), None
    files = bundle.manifest.get("files", {})
    size = sum(int(f.get("size") or 0) for f in files.values())
    llm = bundle.manifest.get("llm", {})
    audio = bundle.manifest.get("audio", {})
    parts = []
    if audio.get("encoders"):
        parts.append("encoders " + "/".join(sorted(audio["encoders"])))
    if llm.get("models"):
        parts.append("LLM " + "/".join(sorted(llm["models"])) + f" (default {llm.get('default_model')})")
    missing = [s for s in ("audio", "llm") if s not in bundle.manifest]
    checked = {"full": "sizes and sha256 match", "size": "sizes match", "none": "files present"}[verify]
    text = (f"{path}: {bundle.bundle_id}, {len(files)} files, {_gib(size)}, {checked} "
            f"({time.monotonic() - t0:.1f} s); {'; '.join(parts)}")
    if missing:
        return Check("bundle", FAIL, f"{text}; no {' and no '.join(missing)} section: not a complete bundle "
                                     "(naturelm-edge build makes both)"), bundle
    return Check("bundle", PASS, text), bundle


def check_llm_offload(jetson: str | None, bundle, cfg) -> Check:
    """Load the bundle's LLM as the daemon would and report llama.cpp's own "offloaded N/M layers to GPU"."""
    if bundle is None:
        return Check("llm offload", SKIP, "no bundle to load (give --bundle or --config)")
    from edge.llm import gpu_offload_supported, probe_offload

    llm = bundle.manifest.get("llm", {})
    qtype = (cfg.bundle.quantization if cfg is not None else None) or llm.get("default_model")
    info = (llm.get("models") or {}).get(qtype)
    if info is None:
        return Check("llm offload", FAIL, f"the bundle has no LLM model {qtype!r}")
    asked = cfg.bundle.n_gpu_layers if cfg is not None else None
    done, total, resolved = probe_offload(bundle.file(info["file"]), asked)
    text = (f"{qtype}: llama.cpp offloaded {done}/{total} layers to the GPU (n_gpu_layers "
            f"{'all' if asked is None or asked < 0 else asked} -> {resolved})")
    if not gpu_offload_supported():
        return Check("llm offload", FAIL if jetson is not None else WARN, f"{text}: this llama.cpp has no GPU offload")
    if done < total:
        return Check("llm offload", WARN, f"{text}: the other layers run on the CPU")
    return Check("llm offload", PASS, text)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    except (OSError, ValueError):
        pass
    return out


def kv_sequences(cfg) -> int:
    """The LLM's KV streams for this config: batch_max windows, each with its base sequence and the beams of its
    beam-searched prompts (edge/llm.py); 1 + upstream's 2 beams without a config."""
    from edge.config import llm_sequences

    if cfg is None:
        return 3
    return llm_sequences(int(cfg.windowing.batch_max), cfg.prompts)


def model_memory(bundle, quantization: str | None, precision: str, sequences: int = 1) -> tuple[int, str]:
    """Bytes the bundle needs resident (model files + KV cache upper bound + runtime overhead), and the sum as text.
    sequences: KV streams the LLM opens (windows x (1 + beams), edge/llm.py), each of at most the manifest's n_ctx."""
    llm = bundle.manifest.get("llm", {})
    audio = bundle.manifest.get("audio", {})
    files = bundle.manifest.get("files", {})
    qtype = quantization or llm.get("default_model")
    llm_file = (llm.get("models", {}).get(qtype) or {}).get("file")
    enc_file = (audio.get("encoders", {}).get(precision) or {}).get("file")
    llm_bytes = int(files.get(llm_file, {}).get("size") or 0)
    enc_bytes = int(files.get(enc_file, {}).get("size") or 0)
    # The manifest gives n_embd, not the KV heads: n_embd per layer and position is the bound without grouped-query
    # attention (Llama 3.1 8B needs a quarter of it: 8 of 32 heads).
    kv = int(llm.get("n_ctx") or 0) * int(llm.get("n_layer") or 0) * 2 * int(llm.get("n_embd") or 0) * 2 * sequences
    need = llm_bytes + enc_bytes + kv + RUNTIME_OVERHEAD_BYTES
    text = (f"LLM {qtype} {_gib(llm_bytes)} + encoder {precision} {_gib(enc_bytes)} + KV cache <= {_gib(kv)} + "
            f"runtime ~{_gib(RUNTIME_OVERHEAD_BYTES)} = {_gib(need)}")
    return need, text


def check_memory(bundle, cfg) -> Check:
    info = _meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None:
        return Check("memory", WARN, "cannot read /proc/meminfo")
    text = f"{_gib(total)} total, {_gib(available or 0)} available"
    if bundle is None:
        return Check("memory", PASS, f"{text} (give --bundle or --config to compare with a bundle)")
    quant = cfg.bundle.quantization if cfg is not None else None
    precision = cfg.bundle.encoder_precision if cfg is not None else "fp32"
    need, parts = model_memory(bundle, quant, precision, kv_sequences(cfg))
    if need > total:
        return Check("memory", FAIL, f"{text}; the bundle needs ~{_gib(need)} ({parts}): choose a smaller "
                                     "quantization (docs/jetson.md)")
    if available is not None and need > available:
        return Check("memory", WARN, f"{text}; the bundle needs ~{_gib(need)} ({parts}), more than is free now")
    return Check("memory", PASS, f"{text}; the bundle needs ~{_gib(need)} ({parts})")


def check_disk(cfg) -> Check:
    from edge.config import DEFAULT_STATE_DIR

    state = cfg.state_dir if cfg is not None else Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0]
                                                       or DEFAULT_STATE_DIR)
    probe = state
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # not created yet (the daemon makes it): the file system it will be on
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("disk", FAIL, f"state_dir {state}: {e.strerror}")
    writable = os.access(probe, os.W_OK)
    text = f"state_dir {state}: {_gib(free)} free" + ("" if probe == state else f" (on {probe}; not created yet)")
    if free < DISK_FAIL_BYTES:
        return Check("disk", FAIL, f"{text}; under {_gib(DISK_FAIL_BYTES)}: the outbox and clips will not fit")
    if not writable:
        return Check("disk", WARN, f"{text}; not writable by this user (the service's own user may differ)")
    if free < DISK_WARN_BYTES:
        return Check("disk", WARN, f"{text}; under {_gib(DISK_WARN_BYTES)}")
    return Check("disk", PASS, text)


def ntp_status(run=subprocess.run) -> tuple[str | None, str]:
    """('yes' | 'no' | None, how it was found) from timedatectl; None when it cannot tell."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None, "timedatectl not found"
    try:
        out = run([exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"timedatectl failed ({e})"
    value = (out.stdout or "").strip()
    if out.returncode != 0 or value not in ("yes", "no"):
        err = (out.stderr or out.stdout or "").strip().splitlines()
        return None, f"timedatectl gave no answer ({err[0] if err else f'exit {out.returncode}'})"
    return value, "timedatectl"


def check_clock(now: datetime | None = None, ntp=ntp_status) -> Check:
    now = now or datetime.now(timezone.utc)
    text = f"{now:%Y-%m-%d %H:%M:%S} UTC"
    if now.year < MIN_YEAR:
        return Check("clock", FAIL, f"{text}: before {MIN_YEAR}, the clock is not set (no RTC battery, no NTP); "
                                    "event timestamps would be wrong")
    synced, how = ntp()
    if synced == "yes":
        return Check("clock", PASS, f"{text}; NTP synchronised ({how})")
    if synced == "no":
        return Check("clock", WARN, f"{text}; NTP not synchronised ({how}): timestamps drift offline; check "
                                    "`timedatectl timesync-status`")
    return Check("clock", WARN, f"{text}; cannot tell whether NTP is synchronised: {how}")


def check_thermal(cfg) -> Check:
    from edge.config import SchedulingConfig
    from edge.thermal import read_zone_temperatures

    t = (cfg.scheduling if cfg is not None else SchedulingConfig()).thermal
    if not t.enabled:
        return Check("thermal", PASS, "thermal shedding is off in the config")
    temps = read_zone_temperatures(t.zones)
    if not temps:
        return Check("thermal", WARN, f"no temperature readable from {', '.join(t.zones)}: thermal shedding cannot "
                                      "act here")
    name, hottest = max(temps.items(), key=lambda kv: kv[1])
    text = f"{len(temps)} zone(s), hottest {name} {hottest:.1f} C; shedding at {t.shed_above_c:g} C"
    return Check("thermal", WARN if hottest >= t.shed_above_c else PASS, text)


def check_encoder_accuracy(bundle, cfg) -> Check:
    """The encoder the daemon will run (its precision, on the provider this machine gives it) against the bundle's
    reference outputs, measured here and now: the int8 kernels differ between CPUs (edge/cpu.py), and the workstation's
    figure says nothing certain about this board (edge/selfcheck.py)."""
    from edge.cpu import cpu_info
    from edge.encoder import AudioEncoder
    from edge.selfcheck import check_encoder

    if bundle is None or "audio" not in bundle.manifest:
        return Check("encoder", SKIP, "needs a bundle with an audio section")
    audio = bundle.manifest["audio"]
    if cfg is not None:
        precisions, provider = [cfg.bundle.encoder_precision], cfg.bundle.provider
    else:
        precisions, provider = sorted(audio.get("encoders", {})), "auto"
    state_dir = cfg.state_dir if cfg is not None else None
    lines, worst = [], PASS
    for precision in precisions:
        encoder = AudioEncoder(bundle, precision=precision, provider=provider, state_dir=state_dir, warmup=False)
        result = check_encoder(encoder, state_dir, use_cache=False)
        if result is None:
            return Check("encoder", WARN, f"{bundle.path} carries no verification data (exported before the device "
                                          "could check itself): re-export it to enable the check")
        if result.passed:
            lines.append(f"{precision} on {result.provider}: mean cosine {result.mean_cosine:.6f}, min "
                         f"{result.min_cosine:.6f}")
        elif cfg is not None and cfg.bundle.accept_encoder_loss:
            worst = WARN if worst == PASS else worst
            lines.append(result.line() + " (accepted by bundle.accept_encoder_loss: the status will say degraded)")
        else:
            worst = FAIL
            lines.append(result.line())
    return Check("encoder", worst, "; ".join(lines) + f" (int8 kernel {cpu_info()['int8_kernel']})")


# --- the command ----------------------------------------------------------------------------------------------------


def run_checks(config: str | None, bundle_dir: str | None, verify: str = "full") -> list[Check]:
    checks: list[Check] = []

    def guarded(name, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a check that breaks is reported, the others still run
            return Check(name, FAIL, f"the check itself failed: {type(e).__name__}: {e}")

    jetson = jetson_info()
    checks.append(guarded("python", check_python))
    checks.append(guarded("board", check_board, jetson))
    got = guarded("config", check_config, config)
    cfg_check, cfg = got if isinstance(got, tuple) else (got, None)
    checks.append(cfg_check)
    checks.append(guarded("onnxruntime", check_providers, jetson, cfg))
    checks.append(guarded("llama.cpp", check_llama, jetson, cfg))
    checks.append(guarded("sandbox", check_sandbox, jetson))
    checks.append(guarded("microphone", check_microphone, cfg))
    checks.append(guarded("broker", check_broker, cfg))
    path = Path(bundle_dir) if bundle_dir else (cfg.bundle.path if cfg is not None else None)
    got = guarded("bundle", check_bundle, path, verify)
    bundle_check, bundle = got if isinstance(got, tuple) else (got, None)
    checks.append(bundle_check)
    checks.append(guarded("encoder", check_encoder_accuracy, bundle, cfg))
    checks.append(guarded("llm offload", check_llm_offload, jetson, bundle, cfg))
    checks.append(guarded("memory", check_memory, bundle, cfg))
    checks.append(guarded("disk", check_disk, cfg))
    checks.append(guarded("clock", check_clock))
    checks.append(guarded("thermal", check_thermal, cfg))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.config, args.bundle, args.verify)
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL, SKIP)}
    if args.json:
        print(json.dumps({"host": socket.gethostname(), "checks": [c.__dict__ for c in checks], "counts": counts,
                          "ok": counts[FAIL] == 0}, indent=1))
    else:
        print(f"naturelm-edge doctor on {socket.gethostname()}: {len(checks)} checks")
        for c in checks:
            print(c.line())
        print(f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return 1 if counts[FAIL] else 0


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine for the field daemon: GPU providers, CUDA in llama.cpp, the unit's GPU devices, "
             "microphone, broker, bundle, the encoder's accuracy on this CPU/GPU, LLM layers on the GPU, memory, disk, "
             "clock, thermal zones "
             "(exit 1 when a check fails)",
        description="Run every check and print one line each: PASS, WARN, FAIL or SKIP with the reason. Exits 1 "
                    "when any check fails. With --config the broker (a real MQTT login), the configured microphone, "
                    "bundle, state directory and thermal zones are checked; --bundle checks a bundle without a "
                    "config.",
    )
    p.add_argument("--config", metavar="FILE", help="daemon configuration (YAML) to check against")
    p.add_argument("--bundle", metavar="DIR", help="model bundle to check (default: the config's bundle.path)")
    p.add_argument("--verify", choices=("full", "size", "none"), default="full",
                   help="how the bundle is checked: full (sha256 of every file; minutes for a multi-GB bundle on a "
                        "slow card), size, none (default full)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
