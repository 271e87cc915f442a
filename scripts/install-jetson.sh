#!/usr/bin/env bash
# Install naturelm-edge on a Jetson Orin (JetPack 6: Ubuntu 22.04, Python 3.10, CUDA 12) as a systemd service.
#
#   sudo scripts/install-jetson.sh [--bundle DIR] [--start] [--index URL] [--prefix DIR] [--dry-run] [--force]
#
# What it does, in order (docs/jetson.md explains each step):
#   1. checks the board: aarch64, L4T R36 (JetPack 6), Python 3.10, nvcc
#   2. apt: python3-venv, build tools, PortAudio, libsndfile
#   3. a `naturelm` system user in the audio, video and render groups
#   4. a virtual environment under PREFIX/venv with
#        llama-cpp-python built from source with CUDA (CMAKE_ARGS="-DGGML_CUDA=on", sm_87: Orin)  -- 20-60 min
#        naturelm-edge itself (from this checkout)
#        onnxruntime-gpu from NVIDIA's Jetson package index in place of PyPI's CPU onnxruntime (PyPI has no
#        Jetson build: its aarch64 GPU wheels are for server ARM, not Tegra)
#   5. checks that onnxruntime has the TensorRT/CUDA providers and llama.cpp has GPU offload; stops if not
#   6. the model bundle (--bundle) to PREFIX/bundle, /etc/naturelm-edge/daemon.yaml (if absent), the systemd units
#   7. the TensorRT engine, once (the naturelm-edge-engine oneshot unit; minutes on first build)
#   8. `naturelm-edge doctor` against the config; with --start, enables and starts the daemon
#
# Re-running it is safe: each step checks what is already there. --dry-run prints the commands and changes nothing
# (it runs anywhere; with --force it also skips the board checks).
set -euo pipefail

PREFIX=/opt/naturelm-edge
ETC=/etc/naturelm-edge
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=""
START=0
DRY_RUN=0
FORCE=0
SKIP_LLAMA=0
# NVIDIA's Jetson AI Lab package index (pip-compatible): JetPack 6.1/6.2 ship CUDA 12.6 (jp6/cu126), JetPack 6.0 CUDA
# 12.2 (jp6/cu122). Detected from nvcc below unless given.
INDEX=""
LLAMA_SPEC='llama-cpp-python>=0.3.16,<0.4'

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --index) INDEX=$2; shift 2 ;;
    --start) START=1; shift ;;
    --skip-llama) SKIP_LLAMA=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-jetson: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

VENV=$PREFIX/venv
PY=$VENV/bin/python
PIP=$VENV/bin/pip

log() { printf '\n[install-jetson] %s\n' "$*"; }
die() { printf '[install-jetson] error: %s\n' "$*" >&2; exit 1; }
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# --- 1. the board -----------------------------------------------------------------------------------------------------
log "1/8 checking the board"
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo $0 ...)"; fi
CUDA_TAG=cu126
if [ "$FORCE" = 0 ]; then
  [ "$(uname -m)" = aarch64 ] || die "this is $(uname -m), not a Jetson (aarch64); --force to go on anyway"
  [ -r /etc/nv_tegra_release ] || die "/etc/nv_tegra_release not found: not a Jetson with L4T; --force to go on"
  l4t=$(head -n1 /etc/nv_tegra_release)
  case "$l4t" in
    *R36*) echo "L4T: $l4t" ;;
    *) die "JetPack 6 (L4T R36) is needed, found: $l4t" ;;
  esac
  pyv=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$pyv" = 3.10 ] || die "JetPack 6 has Python 3.10, found python3 $pyv"
  NVCC=/usr/local/cuda/bin/nvcc
  [ -x "$NVCC" ] || die "$NVCC not found: install the CUDA toolkit (sudo apt install nvidia-jetpack)"
  cuda=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
  CUDA_TAG=cu$cuda
  echo "CUDA: $("$NVCC" --version | tail -n1)"
fi
INDEX=${INDEX:-https://pypi.jetson-ai-lab.io/jp6/$CUDA_TAG}

# --- 2. system packages ---------------------------------------------------------------------------------------------
log "2/8 system packages"
run apt-get update
run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
  python3-venv python3-dev build-essential cmake git libportaudio2 libsndfile1 mosquitto-clients

# --- 3. the service user --------------------------------------------------------------------------------------------
log "3/8 the naturelm user"
if ! id naturelm >/dev/null 2>&1; then
  run useradd --system --home-dir /var/lib/naturelm-edge --shell /usr/sbin/nologin --user-group naturelm
fi
for g in audio video render; do
  if getent group "$g" >/dev/null; then run usermod -aG "$g" naturelm; fi
done

# --- 4. the Python environment --------------------------------------------------------------------------------------
log "4/8 Python environment in $VENV"
[ -x "$PY" ] || run python3 -m venv "$VENV"
run "$PIP" install --upgrade pip wheel
if [ "$SKIP_LLAMA" = 0 ]; then
  # From source with CUDA: there is no CUDA wheel of llama-cpp-python for Jetson. sm_87 is Orin's GPU; without it
  # CMake may pick a generic architecture and the kernels run slower or not at all. The CUDA build is long (tens of
  # minutes on an Orin Nano); -j is bounded to keep an 8 GB board out of the OOM killer.
  run env CUDACXX=/usr/local/cuda/bin/nvcc PATH="/usr/local/cuda/bin:$PATH" \
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" CMAKE_BUILD_PARALLEL_LEVEL=4 FORCE_CMAKE=1 \
    "$PIP" install --no-cache-dir --no-binary llama-cpp-python --force-reinstall --no-deps "$LLAMA_SPEC"
  run "$PIP" install "$LLAMA_SPEC"   # its pure-Python dependencies; the CUDA build above is kept
fi
run "$PIP" install "$SRC"
# PyPI's `onnxruntime` (CPU) and `onnxruntime-gpu` install the same module: replace the one with the other, taking
# the GPU build from NVIDIA's index only (--no-deps: its dependencies came with the CPU build).
run "$PIP" uninstall -y onnxruntime
run "$PIP" install --no-deps --force-reinstall --index-url "$INDEX" onnxruntime-gpu

# --- 5. the GPU paths, or stop ----------------------------------------------------------------------------------------
log "5/8 checking the GPU paths"
run "$PY" - <<'EOF'
import sys
import onnxruntime as ort
from edge.llm import gpu_offload_supported
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
print("llama.cpp GPU offload:", gpu_offload_supported())
if not {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(providers):
    sys.exit("onnxruntime has no GPU provider: the wheel from the Jetson index did not install")
if not gpu_offload_supported():
    sys.exit("llama-cpp-python was built without CUDA: check that nvcc was found in the build log")
EOF

# --- 6. bundle, config, units -----------------------------------------------------------------------------------------
log "6/8 bundle, configuration, systemd units"
if [ -n "$BUNDLE" ]; then
  [ "$DRY_RUN" = 1 ] || [ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE has no manifest.json: not a model bundle"
  run rm -rf "$PREFIX/bundle.new"
  run cp -r "$BUNDLE" "$PREFIX/bundle.new"
  run rm -rf "$PREFIX/bundle"
  run mv "$PREFIX/bundle.new" "$PREFIX/bundle"
fi
run install -d -m 0755 "$ETC"
if [ ! -f "$ETC/daemon.yaml" ]; then
  run install -m 0644 "$SRC/examples/daemon.yaml" "$ETC/daemon.yaml"
  echo "edit $ETC/daemon.yaml (device_id, mqtt, source, prompts) before starting the service"
fi
run install -m 0644 "$SRC/systemd/naturelm-edge.service" "$SRC/systemd/naturelm-edge-engine.service" \
  /etc/systemd/system/
run systemctl daemon-reload

# --- 7. the TensorRT engine, once ------------------------------------------------------------------------------------
log "7/8 TensorRT engine (first build: minutes)"
if [ "$DRY_RUN" = 1 ] || [ -f "$PREFIX/bundle/manifest.json" ]; then
  run systemctl enable naturelm-edge-engine.service
  # Oneshot, as the service's user, into the service's StateDirectory: the daemon finds it there.
  run systemctl start naturelm-edge-engine.service
else
  echo "no bundle in $PREFIX/bundle yet: run 'systemctl start naturelm-edge-engine' after copying one"
fi

# --- 8. doctor, and start ---------------------------------------------------------------------------------------------
log "8/8 naturelm-edge doctor"
# Its exit status is reported, not fatal: an unedited example config fails the broker check by design.
run "$VENV/bin/naturelm-edge" doctor --config "$ETC/daemon.yaml" || echo "doctor found problems (above)"
if [ "$START" = 1 ]; then
  run systemctl enable --now naturelm-edge.service
  echo "journalctl -u naturelm-edge -f   # follow it"
else
  echo "when the doctor is happy: systemctl enable --now naturelm-edge"
fi
