"""The audio encoder on the device: the bundle's ONNX graph in an onnxruntime session.

Normalised fbank features (batch, frames, mel_bins) in, audio embeddings (batch, embeddings_per_clip, width) out; the
shapes, tensor names and file come from the bundle's manifest ("audio" section), never from constants here.

Execution providers, best first: TensorRT (fp16 kernels, engine cached on disk), CUDA, CPU. onnxruntime itself
quietly drops a provider it cannot use (it warns and runs on the next one), so the provider that a session actually
got is read back from it: a provider that was asked for and is missing is an error (ProviderError), and `auto` logs
what it chose and why. Nothing falls back silently.

TensorRT builds an engine for the graph the first time it sees it (minutes on a Jetson). The engine goes into a cache
directory keyed by the GPU's name, the TensorRT version and the ONNX file's sha256, because an engine is only valid for
the exact GPU, TensorRT release and graph it was built from; `naturelm-edge build-engine` fills it once, ahead of the
daemon (a oneshot systemd unit), so that the daemon starts in seconds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from edge.bundle import MANIFEST, Bundle, load_bundle
from edge.errors import AudioError, BundleError, ProviderError

logger = logging.getLogger(__name__)

#: Our short names -> onnxruntime's execution provider names.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_CHOICES = ("auto",) + tuple(PROVIDERS)
_AUTO_ORDER = ("tensorrt", "cuda", "cpu")
_AUDIO_KEYS = ("frames", "mel_bins", "embeddings_per_clip", "embedding_width", "input_name", "output_name", "encoders")
# onnxruntime's exceptions for a file it cannot parse (its pybind types derive from Exception only).
_LOAD_ERRORS = ("InvalidProtobuf", "NoSuchFile", "InvalidGraph", "NoModel")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_state_dir() -> Path:
    """Where engine caches live: systemd's StateDirectory= ($STATE_DIRECTORY), else $XDG_STATE_HOME/naturelm-edge,
    else ~/.local/state/naturelm-edge."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "naturelm-edge"


def gpu_name(device_id: int = 0) -> str | None:
    """The CUDA device's name, from the driver library (present wherever the CUDA provider can run); on a Jetson
    whose driver does not answer, the board model from the device tree. None when neither is there."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        buf = ctypes.create_string_buffer(256)
        if (cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), device_id) == 0
                and cuda.cuDeviceGetName(buf, len(buf), dev) == 0):
            return buf.value.decode(errors="replace").strip() or None
    except (OSError, AttributeError):
        pass
    try:
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
        return model or None
    except OSError:
        return None


def tensorrt_version() -> str | None:
    """TensorRT's library version as libnvinfer reports it (getInferLibVersion: 8601 is 8.6.1, 100300 is 10.3.0),
    or the Python package's version; None when neither is found."""
    for lib in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return str(int(ctypes.CDLL(lib).getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    try:
        import tensorrt  # only its version string is read

        return str(tensorrt.__version__)
    except ImportError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def engine_cache_dir(state_dir: Path, onnx_sha256: str, max_batch: int, gpu: str | None = None,
                     trt: str | None = None) -> Path:
    """state_dir/tensorrt/<gpu>-trt<version>-<onnx sha256[:16]>-b<max batch>: one directory per engine that can
    differ, so a GPU swap, a JetPack upgrade or a new bundle never picks up an engine built for something else."""
    gpu = gpu if gpu is not None else gpu_name()
    trt = trt if trt is not None else tensorrt_version()
    if gpu is None or trt is None:
        logger.warning("could not read the %s; the TensorRT engine cache is keyed on 'unknown' for it",
                       " and ".join(n for n, v in (("GPU name", gpu), ("TensorRT version", trt)) if v is None))
    key = f"{_slug(gpu or 'unknown-gpu')}-trt{_slug(trt or 'unknown')}-{onnx_sha256[:16]}-b{max_batch}"
    return Path(state_dir) / "tensorrt" / key


class AudioEncoder:
    """One onnxruntime session over the bundle's `audio_encoder.<precision>.onnx`.

    bundle: a Bundle from load_bundle, or a bundle directory (then loaded and fully verified here).
    precision: one of the manifest's encoders (fp32, fp16, int8, int8-qdq).
    provider: auto | tensorrt | cuda | cpu. auto takes TensorRT, then CUDA, then CPU, whichever is available first,
        except for int8: its dynamically quantized MatMulInteger graph is made for the CPU (TensorRT and CUDA would run
        it piecemeal), so auto picks the CPU for it and says so. int8-qdq is the static QDQ graph made for TensorRT,
        which builds an int8 engine from it (fp16 where it keeps a layer in float); other providers run its Q/DQ
        pairs as they come.
    state_dir: where TensorRT engines are cached (default: default_state_dir()).
    threads: CPU intra-op threads; 0 lets onnxruntime use one per physical core.
    max_batch: the largest batch TensorRT's engine profile covers (the daemon encodes one window at a time); larger
        batches are split. Ignored by the other providers.
    warmup: run one batch at start, so that the first real window does not pay for allocation, kernel selection and,
        with TensorRT, the engine build.
    """

    def __init__(self, bundle, precision: str = "fp32", provider: str = "auto", state_dir=None, threads: int = 0,
                 max_batch: int = 1, warmup: bool = True):
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(Path(bundle))
        if provider not in PROVIDER_CHOICES:
            raise ProviderError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDER_CHOICES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bundle = bundle
        self.precision = precision
        self.threads = threads
        self.max_batch = max_batch
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.engine_cache_dir: Path | None = None
        self.open_ms: float | None = None
        self.warmup_ms: float | None = None

        manifest_path = bundle.path / MANIFEST
        audio = bundle.section("audio")
        missing = [k for k in _AUDIO_KEYS if k not in audio]
        if missing:
            raise BundleError(f"{manifest_path}: the audio section lacks {', '.join(missing)}")
        encoders = audio["encoders"]
        if not isinstance(encoders, dict) or precision not in encoders:
            have = ", ".join(sorted(encoders)) if isinstance(encoders, dict) else "none"
            raise BundleError(f"{manifest_path}: no {precision} audio encoder in this bundle (it has: {have or 'none'})")
        entry = encoders[precision]
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise BundleError(f"{manifest_path}: audio.encoders.{precision} names no file")
        self.file = bundle.file(entry["file"])
        self.input_name = audio["input_name"]
        self.output_name = audio["output_name"]
        self.frames = int(audio["frames"])
        self.mel_bins = int(audio["mel_bins"])
        self.embeddings_per_clip = int(audio["embeddings_per_clip"])
        self.embedding_width = int(audio["embedding_width"])

        start = time.perf_counter()
        self.session, self.provider = self._open(provider)
        self.open_ms = (time.perf_counter() - start) * 1000.0
        if self.provider != "tensorrt":
            self.engine_cache_dir = None
        self._check_graph()
        if warmup:
            self._warm_up()

    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            self.encode(np.zeros((1, self.frames, self.mel_bins), dtype=np.float32))
        except Exception as e:  # noqa: BLE001 (an engine build or kernel failure surfaces here as onnxruntime's own type)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.provider == "cpu":
                raise BundleError(f"{self.file}: the first run on the CPU failed ({message})") from None
            raise ProviderError(f"{self.provider}: the first run of {self.file} failed ({message})") from None
        self.warmup_ms = (time.perf_counter() - start) * 1000.0
        logger.info("audio encoder %s on %s: session %.0f ms, warm-up %.0f ms", self.file.name, self.provider,
                    self.open_ms, self.warmup_ms)

    # --- session -----------------------------------------------------------------------------------------------------

    def _open(self, requested: str):
        available = available_providers()
        if requested != "auto":
            if PROVIDERS[requested] not in available:
                raise ProviderError(
                    f"{requested} was requested, but this onnxruntime build has no {PROVIDERS[requested]} "
                    f"(it has: {', '.join(available)}){_install_hint(requested)}"
                )
            return self._create(requested, available), requested

        passed_over = []
        for name in _AUTO_ORDER:
            if PROVIDERS[name] not in available:
                passed_over.append(f"{name}: not in this onnxruntime build")
                continue
            if name != "cpu" and self.precision == "int8":
                passed_over.append(f"{name}: the int8 graph is dynamically quantized for the CPU")
                continue
            try:
                session = self._create(name, available)
            except ProviderError as e:
                passed_over.append(f"{name}: {e}")
                logger.warning("audio encoder: %s failed, trying the next provider: %s", name, e)
                continue
            why = "; ".join(passed_over) if passed_over else "the best provider, available"
            logger.info("audio encoder: provider auto chose %s (%s)", name, why)
            return session, name
        raise ProviderError(f"no execution provider could run {self.file} ({'; '.join(passed_over)})")

    def _provider_list(self, name: str, available: list[str]) -> list:
        if name == "cpu":
            return ["CPUExecutionProvider"]
        if name == "cuda":
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        # TensorRT takes the subgraphs it supports; CUDA, then CPU, take any node it rejects (a partition, not a
        # fallback of the whole graph: the session still reports TensorRT first).
        sha = self.bundle.manifest["files"][self.file.name]["sha256"]
        cache = engine_cache_dir(self.state_dir, sha, self.max_batch)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ProviderError(f"{cache}: cannot create the TensorRT engine cache ({e.strerror})") from None
        self.engine_cache_dir = cache
        shape = f"{self.frames}x{self.mel_bins}"
        trt = {
            "device_id": 0,
            "trt_fp16_enable": True,
            # The QDQ graph's scales are explicit: TensorRT needs int8 enabled to use them, and no calibration table.
            "trt_int8_enable": self.precision == "int8-qdq",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            # One profile: the frame axis is fixed by the export, the batch runs from 1 to max_batch.
            "trt_profile_min_shapes": f"{self.input_name}:1x{shape}",
            "trt_profile_opt_shapes": f"{self.input_name}:1x{shape}",
            "trt_profile_max_shapes": f"{self.input_name}:{self.max_batch}x{shape}",
        }
        providers = [("TensorrtExecutionProvider", trt)]
        if "CUDAExecutionProvider" in available:
            providers.append(("CUDAExecutionProvider", {"device_id": 0}))
        return providers + ["CPUExecutionProvider"]

    def _create(self, name: str, available: list[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        # onnxruntime's worker threads spin for a while after each run by default; on the device the LLM runs right
        # after the encoder on the same cores, and spinning threads would steal them (and battery) for nothing.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = self._provider_list(name, available)
        if name == "tensorrt":
            logger.info("audio encoder: TensorRT engine cache %s (a first build takes minutes)", self.engine_cache_dir)
        try:
            session = ort.InferenceSession(str(self.file), sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 (onnxruntime's pybind exceptions share no base below Exception)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if type(e).__name__ in _LOAD_ERRORS or name == "cpu":
                raise BundleError(f"{self.file}: onnxruntime cannot load it ({message}); the file is corrupt, "
                                  "truncated or not an ONNX model") from None
            raise ProviderError(f"{name}: onnxruntime could not create a session for {self.file} ({message})") from None
        got = session.get_providers()
        if not got or got[0] != PROVIDERS[name]:
            raise ProviderError(f"{PROVIDERS[name]} was requested for {self.file}, but onnxruntime registered "
                                f"{', '.join(got) or 'none'} (it could not initialise {name}; check its libraries)")
        if name != "cpu" and self.precision == "int8":
            logger.warning("audio encoder: the int8 graph is dynamically quantized for the CPU; on %s parts of it "
                           "will run on the CPU (use fp32 or fp16 on a GPU)", name)
        return session

    def _check_graph(self) -> None:
        """The graph's tensor names and shapes must be the manifest's."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        where = f"{self.file} (against {self.bundle.path / MANIFEST})"
        if [i.name for i in inputs] != [self.input_name] or self.output_name not in [o.name for o in outputs]:
            raise BundleError(f"{where}: the graph's input/output names {[i.name for i in inputs]}/"
                              f"{[o.name for o in outputs]} are not {self.input_name}/{self.output_name}")
        shape = list(inputs[0].shape)
        if len(shape) != 3 or shape[1:] != [self.frames, self.mel_bins]:
            raise BundleError(f"{where}: the graph's input shape {shape} is not (batch, {self.frames}, "
                              f"{self.mel_bins})")

    # --- inference ---------------------------------------------------------------------------------------------------

    def encode(self, features: np.ndarray) -> np.ndarray:
        """(batch, frames, mel_bins) normalised fbank -> (batch, embeddings_per_clip, embedding_width) float32."""
        x = np.asarray(features)
        want = f"(batch, {self.frames}, {self.mel_bins})"
        if x.ndim != 3 or x.shape[1:] != (self.frames, self.mel_bins):
            raise AudioError(f"features of shape {x.shape}; the audio encoder of {self.bundle.path} takes {want} "
                             f"(manifest audio.frames, audio.mel_bins)")
        if x.shape[0] == 0:
            raise AudioError(f"an empty batch of features (shape {x.shape}); expected {want} with batch >= 1")
        if not np.issubdtype(x.dtype, np.floating):
            raise AudioError(f"features of type {x.dtype}; expected float32 fbank features")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise AudioError(f"features contain {int(np.count_nonzero(~np.isfinite(x)))} NaN or infinite values")
        step = self.max_batch if self.provider == "tensorrt" else x.shape[0]
        parts = [self.session.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                 for i in range(0, x.shape[0], step)]
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if y.shape != (x.shape[0], self.embeddings_per_clip, self.embedding_width):
            raise BundleError(f"{self.file}: output shape {y.shape}, but {self.bundle.path / MANIFEST} says "
                              f"({x.shape[0]}, {self.embeddings_per_clip}, {self.embedding_width})")
        return y

    @property
    def batch_exact(self) -> bool:
        """Whether a window's embeddings are the same encoded alone or in a batch. Not for int8: its dynamic
        quantization takes one activation scale per tensor, over the whole batch, so one loud window would change
        the rounding of a quiet one's."""
        return self.precision != "int8"

    def encode_batch(self, features: np.ndarray, exact: bool = False) -> np.ndarray:
        """`encode` for a batch of windows. One call where the graph allows it (batch_exact: a window's embeddings
        then differ from `encode` alone in float rounding only, the kernels' sums for another batch size), else, or
        with exact=True (bit for bit what `encode` gives each window alone), one call per window."""
        if (self.batch_exact and not exact) or len(features) == 1:
            return self.encode(features)
        return np.concatenate([self.encode(features[i:i + 1]) for i in range(len(features))])


def _install_hint(name: str) -> str:
    if name == "tensorrt":
        return ("; TensorRT needs onnxruntime-gpu built with TensorRT (on Jetson, NVIDIA's JetPack wheel) and "
                "TensorRT's libraries")
    if name == "cuda":
        return "; CUDA needs onnxruntime-gpu (on Jetson, NVIDIA's JetPack wheel) in place of onnxruntime"
    return ""
