#!/usr/bin/env bash
# Install naturelm-edge on a Jetson Orin (JetPack 6.1 / 6.2: L4T R36.4, Ubuntu 22.04, Python 3.10, CUDA 12.6) as a
# systemd service.
#
#   sudo scripts/install-jetson.sh [--bundle DIR] [--start] [--prefix DIR] [--wheel-cache DIR] [--index URL]
#                                  [--skip-llama] [--dry-run] [--board-root DIR] [--force]
#
# What it does, in order (docs/jetson.md explains each step):
#   1. checks the board: aarch64, the JetPack release (6.1/6.2 supported; 6.0, 5.x and 7.x refused with the
#      reason), Python 3.10, nvcc; the Orin Nano (8 GB) gets a llama.cpp build without CUDA VMM
#   2. apt: python3-venv, build tools, PortAudio, libsndfile
#   3. a `naturelm` system user in the audio, video and render groups
#   4. a virtual environment under PREFIX/venv, every pip run under scripts/jetson/constraints.txt (numpy<2):
#        llama-cpp-python, the pinned sdist (sha256), built with CUDA for sm_87, parallel jobs bounded by memory
#        naturelm-edge itself (from this checkout)
#        onnxruntime-gpu and numpy, pinned by sha256 (scripts/jetson/jp6-cu126.lock): downloaded once into the
#        wheel cache, installed from it with --no-index --require-hashes
#   5. checks that onnxruntime has the TensorRT/CUDA providers and llama.cpp has GPU offload; stops if not
#   6. the model bundle (--bundle) to PREFIX/bundle, /etc/naturelm-edge/daemon.yaml (if absent), an empty
#      /etc/naturelm-edge/mqtt-password (if absent: anonymous brokers), the systemd units, and their drop-ins with
#      this board's GPU device nodes (`naturelm-edge jetson-devices`)
#   7. the TensorRT engine, once (the naturelm-edge-engine oneshot unit; minutes on first build)
#   8. `naturelm-edge doctor` against the config; with --start, enables and starts the daemon
#
# Re-running it is safe: each step checks what is already there. --dry-run prints the commands and changes nothing.
# --board-root DIR reads the board's files (etc/nv_tegra_release, proc/device-tree/model, proc/meminfo) under DIR,
# and skips the checks of this machine's architecture, Python and nvcc: with --dry-run it shows what the install
# would do on that board. --force skips the board checks altogether.
set -euo pipefail

PREFIX=/opt/naturelm-edge
ETC=/etc/naturelm-edge
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PINS=$SRC/scripts/jetson
BUNDLE=""
START=0
DRY_RUN=0
FORCE=0
SKIP_LLAMA=0
BOARD_ROOT=""
WHEELS=""
# NVIDIA's Jetson AI Lab package index (pip-compatible), where the pinned onnxruntime-gpu comes from.
INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
SYSTEMD_DIR=/etc/systemd/system

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --index) INDEX=$2; shift 2 ;;
    --wheel-cache) WHEELS=$2; shift 2 ;;
    --board-root) BOARD_ROOT=$2; shift 2 ;;
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
WHEELS=${WHEELS:-$PREFIX/wheels}
# numpy<2 for every pip run below, the dependency resolution of `pip install naturelm-edge` included.
export PIP_CONSTRAINT=$PINS/constraints.txt

log() { printf '\n[install-jetson] %s\n' "$*"; }
die() { printf '[install-jetson] error: %s\n' "$*" >&2; exit 1; }
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# --- 1. the board -----------------------------------------------------------------------------------------------------
log "1/8 checking the board"
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo $0 ...)"; fi
BOARD_MODEL=""
MEM_KB=0
if [ "$FORCE" = 0 ]; then
  if [ -z "$BOARD_ROOT" ]; then
    [ "$(uname -m)" = aarch64 ] || die "this is $(uname -m), not a Jetson (aarch64); --force to go on anyway"
  fi
  release_file=${BOARD_ROOT:-}/etc/nv_tegra_release
  [ -r "$release_file" ] || die "$release_file not found: not a Jetson with L4T; --force to go on"
  l4t=$(head -n1 "$release_file")
  major=$(printf '%s\n' "$l4t" | sed -n 's/^# R\([0-9]*\) (release).*/\1/p')
  revision=$(printf '%s\n' "$l4t" | sed -n 's/.*REVISION: \([0-9][0-9.]*\).*/\1/p')
  [ -n "$major" ] && [ -n "$revision" ] || die "$release_file: cannot read the L4T release from: $l4t"
  release="R$major.$revision"
  # JetPack <-> L4T: 6.0 = R36.2/R36.3, 6.1 = R36.4.0, 6.2 = R36.4.3, 6.2.1 = R36.4.4 (and its updates R36.4.x),
  # 7.x = R38 (docs/jetson.md, "JetPack versions").
  case "$major.$revision" in
    36.4|36.4.*)
      echo "L4T $release: JetPack 6.1/6.2 (Ubuntu 22.04, Python 3.10, CUDA 12.6, TensorRT 10.3): supported"
      case "$revision" in
        4.[7-9]|4.[1-9][0-9]*)
          echo "note: L4T $release has the NvMap fix for CVE-2025-33177, which refuses some single CUDA allocations of"
          echo "      about 1 GiB and more; an 8B LLM's weights may fail to load onto the GPU (docs/jetson.md, 'L4T 36.4.7')."
          echo "      The daemon then runs the LLM on the CPU and reports gpu_fallback." ;;
      esac ;;
    36.*)
      die "L4T $release is JetPack 6.0 (CUDA 12.2, TensorRT 8.6): the pinned onnxruntime-gpu 1.20.0 is built for CUDA \
12.6 and TensorRT 10 (JetPack 6.1+) and does not load there. Upgrade to JetPack 6.1 or 6.2 (docs/jetson.md, 'JetPack \
versions'), or install by hand with a cu122 wheel (--force)" ;;
    38.*)
      die "L4T $release is JetPack 7 (Ubuntu 24.04, Python 3.12, CUDA 13): not supported by this installer. Its pinned \
onnxruntime-gpu (cp310, CUDA 12.6) and llama-cpp-python build were made for JetPack 6 and have never run on JetPack 7; \
there is no pinned cp312/CUDA 13 wheel yet. docs/jetson.md ('JetPack versions') says what a manual install needs" ;;
    35.*|34.*|32.*)
      die "L4T $release is JetPack 5 or older (Ubuntu 20.04, Python 3.8, CUDA 11): naturelm-edge needs Python >= 3.10. \
Flash JetPack 6.1 or 6.2" ;;
    *) die "L4T $release: unknown JetPack release; this installer knows JetPack 6.1/6.2 (L4T R36.4)" ;;
  esac
  model_file=${BOARD_ROOT:-}/proc/device-tree/model
  BOARD_MODEL=$(tr -d '\0' < "$model_file" 2>/dev/null || true)
  echo "board: ${BOARD_MODEL:-unknown}"
  MEM_KB=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' "${BOARD_ROOT:-}/proc/meminfo" 2>/dev/null || echo 0)
  if [ -z "$BOARD_ROOT" ]; then
    pyv=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$pyv" = 3.10 ] || die "JetPack 6 has Python 3.10, found python3 $pyv"
    NVCC=/usr/local/cuda/bin/nvcc
    [ -x "$NVCC" ] || die "$NVCC not found: install the CUDA toolkit (sudo apt install nvidia-jetpack)"
    cuda=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
    [ "$cuda" = 12.6 ] || die "nvcc says CUDA $cuda; JetPack 6.1/6.2 ship CUDA 12.6 (the pinned wheels need it)"
    echo "CUDA: $("$NVCC" --version | tail -n1)"
  fi
fi

# llama.cpp's CUDA build. sm_87 is Orin's GPU. On the 8 GB Orin Nano, ggml's CUDA memory pool reserves 32 GiB of
# virtual address space up front (cuMemAddressReserve), which fails there: build without VMM (ggml-org/llama.cpp
# issue 29142). nvcc jobs take 1.5-2.5 GB each: one job per 3 GiB of memory keeps an 8 GB board out of the OOM killer.
LLAMA_CMAKE="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87"
case "$BOARD_MODEL" in
  *"Orin Nano"*) LLAMA_CMAKE="$LLAMA_CMAKE -DGGML_CUDA_NO_VMM=ON" ;;
esac
CPUS=$(nproc 2>/dev/null || echo 4)
JOBS=$CPUS
if [ "$MEM_KB" -gt 0 ]; then
  by_mem=$(( MEM_KB / (3 * 1024 * 1024) ))
  [ "$by_mem" -ge 1 ] || by_mem=1
  [ "$by_mem" -lt "$JOBS" ] && JOBS=$by_mem
fi
echo "llama.cpp build: CMAKE_ARGS=\"$LLAMA_CMAKE\", $JOBS parallel job(s)"

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
log "4/8 Python environment in $VENV (constraints: $PIP_CONSTRAINT)"
[ -x "$PY" ] || run python3 -m venv "$VENV"
run "$PIP" install --upgrade pip wheel
run install -d -m 0755 "$WHEELS"

# A lock file's wheels are in the cache when every sha256 it names is the sha256 of a file there.
in_cache() {
  local lock=$1 h f ok
  for h in $(grep -o 'sha256:[0-9a-f]*' "$lock" | cut -d: -f2); do
    ok=0
    for f in "$WHEELS"/*; do
      [ -f "$f" ] && [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$h" ] && { ok=1; break; }
    done
    [ "$ok" = 1 ] || return 1
  done
}
fetch_once() {  # lock file, pip download options...
  local lock=$1; shift
  if [ "$DRY_RUN" = 0 ] && in_cache "$lock"; then
    echo "wheel cache $WHEELS has everything $lock pins"
  else
    run "$PIP" download --no-deps --require-hashes --dest "$WHEELS" "$@" -r "$lock"
  fi
}

if [ "$SKIP_LLAMA" = 0 ]; then
  # From the pinned sdist, with CUDA: there is no CUDA wheel of llama-cpp-python for Jetson.
  # The sdist is hash-checked into the cache; its build requirements come from PyPI (build isolation).
  fetch_once "$PINS/llama-cpp-python.lock" --no-binary :all:
  llama_version=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' "$PINS/llama-cpp-python.lock")
  run env CUDACXX=/usr/local/cuda/bin/nvcc PATH="/usr/local/cuda/bin:$PATH" CMAKE_ARGS="$LLAMA_CMAKE" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" MAKEFLAGS="-j$JOBS" FORCE_CMAKE=1 \
    "$PIP" install --no-cache-dir --force-reinstall --no-deps "$WHEELS/llama_cpp_python-$llama_version.tar.gz"
fi
run "$PIP" install "$SRC"   # naturelm-edge and its pure-Python dependencies (the CUDA build above is kept)
# PyPI's `onnxruntime` (CPU) and `onnxruntime-gpu` install the same module: replace the one with the other. Its
# dependencies came with the CPU build; numpy 1.26.4 is pinned with it.
run "$PIP" uninstall -y onnxruntime
fetch_once "$PINS/jp6-cu126.lock" --index-url "$INDEX" --extra-index-url https://pypi.org/simple
run "$PIP" install --no-index --find-links "$WHEELS" --require-hashes --no-deps --force-reinstall \
  -r "$PINS/jp6-cu126.lock"

# --- 5. the GPU paths, or stop ----------------------------------------------------------------------------------------
log "5/8 checking the GPU paths"
run "$PY" - <<'EOF'
import sys
import numpy
import onnxruntime as ort
from edge.llm import gpu_offload_supported
providers = ort.get_available_providers()
print("numpy", numpy.__version__, "onnxruntime", ort.__version__, providers)
print("llama.cpp GPU offload:", gpu_offload_supported())
if int(numpy.__version__.split(".")[0]) >= 2:
    sys.exit("numpy " + numpy.__version__ + ": the Jetson onnxruntime-gpu wheel needs numpy<2")
if not {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(providers):
    sys.exit("onnxruntime has no GPU provider: the wheel from the Jetson index did not install")
if not gpu_offload_supported():
    sys.exit("llama-cpp-python was built without CUDA: check that nvcc was found in the build log")
EOF

# --- 6. bundle, config, credential, units -----------------------------------------------------------------------------
log "6/8 bundle, configuration, credential, systemd units"
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
# The unit's LoadCredential= fails the start (243/CREDENTIALS) when the file is missing. Empty, root-only: the unit
# starts against an anonymous broker without edits; for a password, write it here and set
# mqtt.password_credential: mqtt-password in daemon.yaml.
if [ ! -e "$ETC/mqtt-password" ]; then
  run install -m 0600 -o root -g root /dev/null "$ETC/mqtt-password"
fi
run install -m 0644 "$SRC/systemd/naturelm-edge.service" "$SRC/systemd/naturelm-edge-engine.service" "$SYSTEMD_DIR/"
# The GPU's device nodes, read off this board: the units' DevicePolicy=closed lets nothing else through.
run "$VENV/bin/naturelm-edge" jetson-devices --root "${BOARD_ROOT:-/}" \
  --write "$SYSTEMD_DIR/naturelm-edge.service.d" --write "$SYSTEMD_DIR/naturelm-edge-engine.service.d"
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
  echo "journalctl -u naturelm-edge -f   # follow it; the health topic says 'gpu_fallback' if the GPU was refused"
else
  echo "when the doctor is happy: systemctl enable --now naturelm-edge"
fi
