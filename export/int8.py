"""int8 audio encoders: the schemes, and the audio they are calibrated on.

Two int8 graphs, for two kinds of runtime (chosen by measurement: benchmarks/int8_schemes.py, table in README.md):

- `int8` (CPU, onnxruntime): dynamic quantization of the weight matrices with **u8 weights** (U8U8). Activations are
  quantized per call. On x86 without VNNI, onnxruntime's u8 x s8 kernel sums pairs of products in a saturating int16
  (`vpmaddubsw`); u8 x u8 widens to 16 bits first and cannot saturate, so the same file is accurate on AVX2-only,
  AVX-512/VNNI and ARM (Jetson) CPUs alike. Measured on the tiny preset: s8 weights give mean cosine 0.9887 to float32
  on AVX2 against 0.9989 with VNNI; u8 weights give the same figure on both.
- `int8-qdq` (TensorRT, and any runtime that runs QDQ): static quantization in QDQ form, symmetric s8 activations and
  per-channel s8 weights (TensorRT's explicit-quantization form: it fuses each Q/DQ pair into an int8 kernel, with
  fp16 for what it leaves in float), scales calibrated on audio (`calibration_inputs`) at the 99.99th percentile.

Why onnxruntime.quantization and not optimum's ORTQuantizer: ORTQuantizer wraps these same two functions; its value is
Hugging Face model configs, which an exported BEATs graph does not have, and its package (optimum-onnx) pins
transformers and optimum versions the project need not follow. Calling onnxruntime directly keeps every choice
visible, and the calibration reader below is the one piece optimum would otherwise supply (its calibration datasets
come from the Hub, which the build machines cannot reach).

Common to both: `quant_pre_process` first (shape inference and constant folding: onnxruntime then fuses each
quantized MatMul with its dequantization, 3.7x faster on the small preset); MatMul only (every Linear; the two
convolutions stay float32: onnxruntime's ConvInteger has no optimised CPU kernel and they are a few percent of the
work); MatMulConstBOnly (the activation x activation products inside attention stay float: quantizing both sides
costs accuracy for little speed); per-channel weight scales.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: scheme name -> how it is made. The names used by benchmarks/int8_schemes.py; `int8` and `int8-qdq` map to two.
SCHEMES = {
    "dyn-s8": {"mode": "dynamic", "weight": "s8", "reduce_range": False},
    "dyn-s8-rr": {"mode": "dynamic", "weight": "s8", "reduce_range": True},
    "dyn-u8u8": {"mode": "dynamic", "weight": "u8", "reduce_range": False},
    "qdq-s8s8": {"mode": "static", "activation": "s8", "weight": "s8"},
    "qdq-u8s8": {"mode": "static", "activation": "u8", "weight": "s8"},
}
#: Static scales cover this percentile of each activation's |values| over the calibration audio, not its maximum: a
#: few outliers (DeepNorm's residual stream has them) would otherwise stretch the int8 grid over values that almost
#: never occur. Measured on the tiny preset (qdq-s8s8, mean / min cosine to float32): MinMax 0.99503 / 0.98632,
#: entropy 0.99503 / 0.98632, percentile 99.99 0.99881 / 0.99527.
CALIBRATION_PERCENTILE = 99.99
#: The bundle's precisions and the scheme each is made with.
PRECISION_SCHEME = {"int8": "dyn-u8u8", "int8-qdq": "qdq-s8s8"}


class _QuietRootInfo(logging.Filter):
    """onnxruntime.quantization logs one INFO line per tensor on the root logger; keep warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def calibration_inputs(count: int = 8, seed: int = 1000) -> list[np.ndarray]:
    """Normalised fbank of synthetic field audio, (1, frames, mel) each: bird-like chirps at several loudnesses, tones
    at 2-7.5 kHz, noise from faint to loud, silence. Seeds start at `seed`, away from the verification inputs' (0)
    so that the accuracy figures are not measured on the calibration set. Real recordings would be better and cannot
    be downloaded here; what matters for the scales is the range of each activation, which these span (silence to a
    near-full-scale call)."""
    from edge.spec import CLIP_SAMPLES, FBANK
    from export.onnx_export import reference_features, synthetic_chirp

    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / FBANK.sample_rate
    clips = [np.zeros(CLIP_SAMPLES, dtype=np.float32)]
    for i in range(max(1, count - 1)):
        kind = i % 3
        if kind == 0:
            clip = synthetic_chirp(seed=seed + i) * (0.2 + 1.6 * rng.random())
        elif kind == 1:
            f = rng.uniform(2000, 7500)
            clip = 0.5 * rng.random() * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(t.size)
        else:
            clip = 10 ** rng.uniform(-3, -0.5) * rng.standard_normal(t.size)
        clips.append(np.clip(clip, -1, 1).astype(np.float32))
    return [reference_features(c) for c in clips[:count]]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: get_next() -> {input name: array} or None."""

    def __init__(self, input_name: str, inputs: list[np.ndarray]):
        self._items = iter([{input_name: x} for x in inputs])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # not needed by MinMax calibration; part of the protocol
        pass


def quantize(src: Path, dst: Path, scheme: str, input_name: str = "fbank", calibration=None) -> None:
    """Quantize the float32 graph `src` into `dst` with one of SCHEMES."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = SCHEMES[scheme]
    qtype = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    quiet = _QuietRootInfo()
    root = logging.getLogger()
    root.addFilter(quiet)  # only records logged on the root logger itself pass through its filters
    prepared = Path(dst).with_suffix(".prepared.onnx")
    try:
        quant_pre_process(str(src), str(prepared))
        if spec["mode"] == "dynamic":
            quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                             reduce_range=spec["reduce_range"], weight_type=qtype[spec["weight"]],
                             extra_options={"MatMulConstBOnly": True})
        else:
            inputs = calibration if calibration is not None else calibration_inputs()
            symmetric = spec["activation"] == "s8"
            quantize_static(str(prepared), str(dst), _Reader(input_name, inputs), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                            activation_type=qtype[spec["activation"]], weight_type=qtype[spec["weight"]],
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": symmetric,
                                           "WeightSymmetric": True, "CalibPercentile": CALIBRATION_PERCENTILE})
    finally:
        root.removeFilter(quiet)
        prepared.unlink(missing_ok=True)
        for leftover in Path(dst).parent.glob("augmented_model*.onnx"):  # quantize_static's calibration graph
            leftover.unlink(missing_ok=True)
