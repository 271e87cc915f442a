"""ONNX export of NatureLM-audio's audio side (BEATs -> ln_audio -> window Q-Former -> projection), its fp16 and int8
variants, and their verification against the PyTorch reference.

The graph goes from the *normalised* fbank, (batch, frames, mel_bins) float32, to the audio embeddings,
(batch, embeddings_per_clip, embedding_width) float32. The fbank stays outside: it needs a complex FFT, which ONNX
exports poorly, and the device computes it in numpy (edge/fbank.py).

The frame axis is fixed (998 for a 10 s clip), only the batch axis is dynamic:
- the reference always truncates or pads a clip to 10 s, so every window has the same frame count anyway;
- TensorRT builds one optimisation profile per input-shape range; with one fixed frame count the engine is built once
  and tuned for exactly the shape it will see, instead of for a range it never uses;
- the relative-position buckets (a log and a table lookup over token pairs) and the window slicing depend only on the
  token count, so with it fixed they are folded into constants at export and cost nothing at run time.

Every exported graph is run on fixed and random inputs and compared with the PyTorch model it came from; the errors go
into the manifest's "audio" section, and a graph outside its tolerance is refused (see `TOLERANCES`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import edge
from edge.bundle import MANIFEST, update_manifest
from edge.errors import NatureLMEdgeError
from edge.selfcheck import VERIFICATION_FILE
from edge.spec import CLIP_SAMPLES, CLIP_SECONDS, FBANK, RESAMPLER, beats_tokens, fbank_frames

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
#: What `export` and `build` make when --precision is not given: the CPU int8 graph and the float ones. int8-qdq is
#: for TensorRT (a Jetson); ask for it by name.
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "fbank"
OUTPUT_NAME = "audio_embeddings"
OPSET = 17
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Tolerance:
    """What a graph must achieve against the PyTorch float32 reference, over every verification input.

    max_abs_error is relative to the output's scale: |onnx - torch| <= max_abs_error * max(1, max |torch|).
    """

    max_abs_error: float
    mean_cosine: float
    min_cosine: float | None = None

    def to_dict(self) -> dict:
        bound = None if math.isinf(self.max_abs_error) else self.max_abs_error  # JSON has no infinity
        return {"max_abs_error_relative_to_output_scale": bound, "mean_cosine": self.mean_cosine,
                "min_cosine": self.min_cosine}


TOLERANCES = {
    # Same float32 arithmetic in another order: onnxruntime fuses (LayerNorm, GELU, MatMul+Add) and blocks its sums
    # differently from PyTorch. Each of the ~15 sublayers rounds at float32's 6e-8 and the post-norm LayerNorms keep
    # the errors from compounding, so disagreements land near 1e-6 of the output's scale (measured: 6e-7 on the tiny
    # preset, 8e-7 on the release-sized small one). 1e-4 leaves two orders of magnitude for other CPUs' kernels and is still three
    # orders below any real bug (a wrong constant, a lost scale or a transposed window moves outputs by O(1)).
    "fp32": Tolerance(max_abs_error=1e-4, mean_cosine=0.99999),
    # Reduced precision is judged by direction, which is what the LLM reads from an embedding: the project's quality
    # bar is a mean cosine of 0.99 to the float32 reference. The max error is reported, not bounded.
    "fp16": Tolerance(max_abs_error=math.inf, mean_cosine=0.99),
    # int8 (dynamic, u8 weights; export/int8.py), measured (benchmarks/results/int8_schemes.json): mean / min cosine
    # 0.99976 / 0.99944 on the tiny preset with AVX-512 VNNI and the same on an (emulated) AVX2-only CPU, 0.99963 /
    # 0.99952 on the small preset; ARM's dot-product kernels are exact like VNNI. So 1 - cosine <= 4e-4 (mean) and
    # 6e-4 (min) on every path: the bounds leave 12x and 33x that, and still fail what is broken: the earlier s8
    # scheme on a saturating AVX2 CPU (0.98873 / 0.98220 on the tiny bundle) and a 2-bit re-quantization (0.53).
    "int8": Tolerance(max_abs_error=math.inf, mean_cosine=0.995, min_cosine=0.98),
    # int8-qdq (static, for TensorRT), on onnxruntime's CPU kernels: 0.99874 / 0.99527 (tiny) and 0.99404 / 0.99278
    # (small) with VNNI; 0.99292 / 0.98164 (tiny) on an AVX2-only CPU, where its s8 x s8 products saturate. TensorRT's
    # int8 kernels do not saturate. The project's bar (0.99 mean) with a min of 0.97: a QDQ graph with a lost scale
    # or zero point falls far below both; a CPU without VNNI is where it is closest, and the device says so there.
    "int8-qdq": Tolerance(max_abs_error=math.inf, mean_cosine=0.99, min_cosine=0.97),
}

# LayerNormalization stays in float32 in the fp16 graph: its variance is a sum of squares over the 768 channels of a
# residual stream (a DeepNorm one, scaled up by alpha each layer), which overflows float16's 65504 once the RMS passes
# ~9, and the Q-Former's eps of 1e-12 is below float16's smallest subnormal. Kernels that accumulate in float32 avoid
# both, but not every execution provider has them. Softmax stays in float16: every kernel subtracts the row maximum
# first, so only its input's range matters, and `activation_ranges` checks that against the float16 limit.
FP16_KEEP_FLOAT32_OPS = ("LayerNormalization",)


class ExportError(NatureLMEdgeError):
    """An exported graph that does not reproduce the PyTorch reference, or an export that cannot proceed."""


def encoder_file(precision: str) -> str:
    return f"audio_encoder.{precision}.onnx"


def parse_precisions(text: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8'] in canonical order; unknown names are an error naming them."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or not names:
        raise ExportError(f"--precision: unknown precision {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in names]


# --- verification inputs ------------------------------------------------------------------------------------------

def synthetic_chirp(seconds: float = CLIP_SECONDS, sample_rate: int = FBANK.sample_rate, seed: int = 0) -> np.ndarray:
    """A bird-like test signal: falling frequency sweeps with harmonics, repeated with gaps, over faint noise.

    Real audio cannot be downloaded here; this gives the encoder the structure of a call (tonal energy moving
    across mel bands, onsets, silence between calls) rather than the flat spectrum of random numbers."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    out = 0.003 * rng.standard_normal(n)
    call, period = 0.25, 0.7
    for start in np.arange(0.3, seconds - call, period):
        i0, i1 = int(start * sample_rate), int((start + call) * sample_rate)
        tau = t[i0:i1] - start
        f0, f1 = 6500.0, 2200.0  # exponential sweep down, as many passerine notes do
        k = math.log(f1 / f0) / call
        phase = 2 * math.pi * f0 * (np.exp(k * tau) - 1.0) / k
        freq = f0 * np.exp(k * tau)
        envelope = np.sin(math.pi * tau / call) ** 2
        for h, amp in ((1, 0.5), (2, 0.15), (3, 0.05)):
            below_nyquist = h * freq < 0.45 * sample_rate  # no harmonic folds back as an alias
            out[i0:i1] += envelope * amp * np.sin(h * phase) * below_nyquist
    return out.astype(np.float32)


def reference_features(waveform: np.ndarray, sample_rate: int = FBANK.sample_rate) -> np.ndarray:
    """The normalised fbank of a clip as the reference computes it (export/fbank.py): (1, frames, mel) float32."""
    from export.fbank import kaldi_fbank, normalize_fbank, reference_waveform

    clip = reference_waveform(waveform, sample_rate)
    return normalize_fbank(kaldi_fbank(clip)).numpy().astype(np.float32)


def verification_inputs(frames: int, mel_bins: int, seed: int = 0) -> dict:
    """Named inputs every exported graph is checked on.

    - silence: the fbank of an all-zero clip, a constant at the log floor (what a padded tail looks like); a constant
      input is where LayerNorm's eps and a reduced-precision variance matter most;
    - chirp: the fbank of `synthetic_chirp`, the nearest to real audio available here;
    - random: seeded Gaussian noise at the spread of a normalised fbank (std ~0.5), batch 2, so that the dynamic batch
      axis is exercised and a graph specialised to batch 1 is caught.
    """
    rng = np.random.default_rng(seed)
    silence = reference_features(np.zeros(CLIP_SAMPLES, dtype=np.float32))
    chirp = reference_features(synthetic_chirp(seed=seed))
    if silence.shape[1:] != (frames, mel_bins):
        raise ExportError(f"the reference fbank gives {silence.shape[1:]}, the export expects {(frames, mel_bins)}")
    return {
        "silence": silence,
        "chirp": chirp,
        "random": (0.5 * rng.standard_normal((2, frames, mel_bins))).astype(np.float32),
    }


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def verify(path: Path, precision: str, inputs: dict, references: dict) -> dict:
    """Run the graph at `path` on every input and judge it against the PyTorch outputs with TOLERANCES[precision].

    The comparison and the judgement are the device's own (edge/selfcheck.py), so that the figure in the manifest and
    the figure a device measures at start mean the same thing. The CPU features and int8 kernel path are recorded with
    it: a reduced-precision figure holds for that path only."""
    from edge.cpu import cpu_info
    from edge.selfcheck import compare, json_safe, judge

    sess = _session(path)
    per_input, measured = {}, []
    for name, x in inputs.items():
        y = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if y.shape != references[name].shape:
            raise ExportError(f"{path}: output shape {y.shape} on input {name!r} of shape {x.shape}; the PyTorch "
                              f"reference gives {references[name].shape}")
        m = compare(y, references[name])
        per_input[name] = {k: m[k] for k in ("max_abs_error", "mean_cosine", "min_cosine")}
        per_input[name]["shape"] = list(x.shape)
        measured.append((m, y.shape[0] * y.shape[1]))
    tol = TOLERANCES[precision]
    j = judge(measured, tol.to_dict())
    result = {
        "against": "PyTorch float32 reference (export.checkpoint.load_audio_model)",
        "max_abs_error": j["max_abs_error"],
        "reference_max_abs": j["reference_max_abs"],
        "mean_cosine": j["mean_cosine"],
        "min_cosine": j["min_cosine"],
        "finite": j["finite"],
        "inputs": per_input,
        "tolerance": tol.to_dict(),
        "cpu": cpu_info(),
        "passed": j["passed"],
    }
    if j["failure"]:
        result["failure"] = j["failure"]
    return json_safe(result)


# --- the three graphs ---------------------------------------------------------------------------------------------

def export_fp32(model: torch.nn.Module, path: Path, frames: int, mel_bins: int) -> None:
    """Trace the reference model into an ONNX graph with a dynamic batch axis and a fixed frame axis."""
    import onnx

    dummy = torch.zeros(1, frames, mel_bins)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns where a shape becomes a Python int (token count, window count): with the frame axis fixed
        # that is intended, and verification with batch 2 catches any batch dimension baked in by mistake.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter (dynamo=False) is deprecated in favour of torch.export, but it is the one checked
        # to work with this torch and this model (a plain feed-forward graph, nothing the tracer gets wrong); the
        # dynamo exporter would add onnxscript to the export extra for no gain here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    onnx.checker.check_model(str(path))


def convert_fp16(src: Path, dst: Path) -> None:
    """float16 weights and activations with float32 inputs and outputs (the front end and the LLM stay float32).

    onnxruntime's own converter (onnxruntime.transformers.float16) is maintained with the runtime that executes the
    result, and keeps the ops of its block list, plus FP16_KEEP_FLOAT32_OPS, in float32 with casts around them."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the model has values out of float16 range": checked below
        model16 = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FLOAT32_OPS)
        )
    onnx.save(model16, str(dst))


def quantize_int8(src: Path, dst: Path, precision: str = "int8") -> None:
    """The int8 graph of `precision` (int8: dynamic U8U8 for CPUs; int8-qdq: static QDQ for TensorRT): export/int8.py
    says why each scheme."""
    from export.int8 import PRECISION_SCHEME, quantize

    quantize(src, dst, PRECISION_SCHEME[precision], input_name=INPUT_NAME)


def activation_ranges(fp32_path: Path, x: np.ndarray) -> dict:
    """Largest |value| entering the LayerNormalization and Softmax nodes of the float32 graph, on input `x`.

    The float16 graph computes the residual additions that feed LayerNorm, and the attention scores that feed
    Softmax, in float16: this says how far they are from its 65504 limit."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    watched = {}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            watched.setdefault(node.op_type, []).append(node.input[0])
    existing = {o.name for o in model.graph.output}
    for names in watched.values():
        for name in names:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                existing.add(name)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    del model
    result = {}
    for op, names in watched.items():
        values = sess.run(names, {INPUT_NAME: x})
        result[f"{op}_input_max_abs"] = float(max(np.abs(v).max() for v in values))
    return result


# --- the bundle -----------------------------------------------------------------------------------------------------

def _tool_versions() -> dict:
    import onnx
    import onnxruntime

    return {"naturelm-edge": edge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _existing_audio(out_dir: Path, naturelm_sha: str) -> dict:
    """Encoders already in the bundle from the same checkpoint (kept when exporting more precisions); a bundle made
    from another checkpoint is refused rather than mixed."""
    import json

    path = out_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable manifest ({e}); export into an empty directory") from None
    audio = manifest.get("audio") or {}
    previous = ((manifest.get("source") or {}).get("naturelm") or {}).get("sha256")
    if audio.get("encoders") and previous != naturelm_sha:
        raise ExportError(f"{path}: the bundle's audio encoders come from another NatureLM checkpoint "
                          f"(sha256 {str(previous)[:16]}...); export into an empty directory")
    return dict(audio.get("encoders") or {})


def export_bundle(naturelm_dir: Path, out_dir: Path, precisions=DEFAULT_PRECISIONS, seed: int = 0,
                  progress: bool = True) -> dict:
    """Export, verify and record the audio encoder in each precision. Returns the bundle's manifest.

    fp16 and int8 are derived from the float32 graph, which is therefore always exported and verified first (and kept
    only when asked for)."""
    from tqdm import tqdm

    from export.checkpoint import load_audio_model, open_checkpoint

    precisions = [p for p in PRECISIONS if p in precisions]
    if not precisions:
        raise ExportError(f"no precision to export; choose from {', '.join(PRECISIONS)}")
    naturelm_dir, out_dir = Path(naturelm_dir), Path(out_dir)
    steps = ["open checkpoint", "reference outputs", "export fp32", "verify fp32"]
    for p in precisions:
        if p != "fp32":
            steps += [f"convert {p}", f"verify {p}"]
    steps.append("write manifest")
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress, leave=True)

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.refresh()

    def done() -> None:
        bar.update(1)

    try:
        step("open checkpoint")
        ckpt = open_checkpoint(naturelm_dir)
        model = load_audio_model(ckpt)
        naturelm_sha = ckpt.sha256()
        out_dir.mkdir(parents=True, exist_ok=True)
        encoders = _existing_audio(out_dir, naturelm_sha)
        cfg = ckpt.config
        frames, mel = fbank_frames(CLIP_SAMPLES), FBANK.num_mel_bins
        tokens = beats_tokens(frames, mel, cfg.beats.input_patch_size)
        per_clip = (tokens - cfg.window_kernel) // cfg.window_stride + 1
        width = ckpt.llm_width
        done()

        step("reference outputs")
        inputs = verification_inputs(frames, mel, seed)
        with torch.no_grad():
            references = {k: model(torch.from_numpy(x)).numpy() for k, x in inputs.items()}
        got = references["chirp"].shape[1:]
        if got != (per_clip, width):
            raise ExportError(f"{naturelm_dir}: the model gives {got} embeddings per clip, the spec expects "
                              f"{(per_clip, width)}")
        done()

        work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
        try:
            written = {}
            fp32 = work / encoder_file("fp32")
            step("export fp32")
            export_fp32(model, fp32, frames, mel)
            done()
            step("verify fp32")
            ver = verify(fp32, "fp32", inputs, references)
            if not ver["passed"]:
                raise ExportError(f"{naturelm_dir}: the fp32 ONNX graph does not reproduce the PyTorch reference "
                                  f"({ver['failure']}); refusing to write it")
            written["fp32"] = (fp32, ver)
            done()
            for p in precisions:
                if p == "fp32":
                    continue
                path = work / encoder_file(p)
                step(f"convert {p}")
                if p == "fp16":
                    convert_fp16(fp32, path)
                else:
                    quantize_int8(fp32, path, p)
                done()
                step(f"verify {p}")
                ver = verify(path, p, inputs, references)
                if p == "fp16":
                    ranges = activation_ranges(fp32, inputs["chirp"])
                    ver["fp32_activation_ranges_on_chirp"] = ranges
                    ver["float16_max"] = FP16_MAX
                    worst = max(ranges.values(), default=0.0)
                    if worst > FP16_MAX / 4:  # two bits of headroom: real audio can be louder than the chirp
                        raise ExportError(f"{naturelm_dir}: the fp16 graph's activations reach {worst:.3g}, too close "
                                          f"to float16's {FP16_MAX:.0f}; leave fp16 out of --precision")
                if not ver["finite"]:
                    # NaN or infinity is broken on every machine: refused, as fp32 outside tolerance is.
                    raise ExportError(f"{naturelm_dir}: the {p} ONNX graph gives non-finite outputs; refusing to "
                                      "write it")
                if not ver["passed"]:
                    # Accuracy of reduced precision depends on the kernels that run it (edge/cpu.py): the device
                    # measures again where it runs (edge/selfcheck.py), so this machine's figure is a warning only.
                    logger.warning("%s encoder on this machine (%s int8 kernel): %s; it is written all the same, and "
                                   "the device checks it again on its own CPU or GPU before using it", p,
                                   ver["cpu"]["int8_kernel"], ver["failure"])
                written[p] = (path, ver)
                done()
                logger.info("%s: mean cosine %.6f, min %.6f, max abs error %.3g", p, ver["mean_cosine"],
                            ver["min_cosine"], ver["max_abs_error"])

            step("write manifest")
            _write_verification_data(work / VERIFICATION_FILE, inputs, references)
            os.replace(work / VERIFICATION_FILE, out_dir / VERIFICATION_FILE)
            for p in precisions:
                path, ver = written[p]
                os.replace(path, out_dir / encoder_file(p))
                encoders[p] = {"file": encoder_file(p), "opset": OPSET, "verification": ver}
        finally:
            shutil.rmtree(work, ignore_errors=True)

        audio = {
            "sample_rate": FBANK.sample_rate,
            "clip_seconds": CLIP_SECONDS,
            "fbank": FBANK.to_dict(),
            "resampler": RESAMPLER.to_dict(),
            "frames": frames,
            "mel_bins": mel,
            "embeddings_per_clip": per_clip,
            "embedding_width": width,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "encoders": encoders,
            # What the device needs to check its own encoder (edge/selfcheck.py): the inputs above and the PyTorch
            # float32 reference's outputs for them.
            "verification_data": {"file": VERIFICATION_FILE, "inputs": list(inputs),
                                  "against": "PyTorch float32 reference (export.checkpoint.load_audio_model)"},
        }
        source = {"naturelm": {"sha256": naturelm_sha,
                               "config_sha256": _sha256(naturelm_dir / "config.json")}}
        manifest = update_manifest(out_dir, "audio", audio, files=[encoder_file(p) for p in precisions] + [VERIFICATION_FILE],
                                   tools=_tool_versions(), source=source)
        done()
        return manifest
    finally:
        bar.close()


def _write_verification_data(path: Path, inputs: dict, references: dict) -> None:
    """inputs and reference outputs, float32, uncompressed .npz (numpy reads it without pickle on the device)."""
    arrays = {f"input.{k}": np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    arrays.update({f"reference.{k}": np.asarray(v, dtype=np.float32) for k, v in references.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _sha256(path: Path) -> str:
    from edge.hashing import sha256_file

    return sha256_file(path)
