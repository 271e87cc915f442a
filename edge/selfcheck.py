"""The encoder checks itself where it runs.

The same int8 graph gives different numbers on different CPUs (edge/cpu.py: x86 without VNNI saturates u8 x s8
products; ARM and VNNI x86 do not), and a TensorRT engine is built on the device from the ONNX file, so the figure
the workstation measured at export says nothing certain about the device. The bundle therefore carries what the device
needs to measure again: `audio_verification.npz` (the fixed verification inputs, normalised fbank, and the PyTorch
float32 reference's outputs for them; its sha256 is in the manifest like every file) and each precision's tolerance.

`check_encoder` runs the opened encoder (its precision, on the provider it actually got, the TensorRT engine included)
on those inputs and compares with the reference: mean and minimum cosine, max abs error relative to the output's scale,
finiteness. The result is cached in the state directory under a key made of everything that can change the numbers
(the ONNX file's sha256, precision, provider, TensorRT engine directory, onnxruntime version, the CPU's int8 kernel),
so a daemon restart costs nothing and a new bundle, engine, runtime or board is checked again.

Out of tolerance is one line naming the precision, the provider and the figure. The daemon refuses to run on it unless
`bundle.accept_encoder_loss` is true, and then says so in health and the retained status (`encoder_accuracy`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.cpu import cpu_info
from edge.errors import BundleError, NatureLMEdgeError

logger = logging.getLogger(__name__)

VERIFICATION_FILE = "audio_verification.npz"
CACHE_VERSION = 1

#: The tolerance a precision gets when the manifest records none (bundles exported before this field existed).
DEFAULT_TOLERANCES = {
    "fp32": {"max_abs_error_relative_to_output_scale": 1e-4, "mean_cosine": 0.99999, "min_cosine": None},
    "fp16": {"max_abs_error_relative_to_output_scale": None, "mean_cosine": 0.99, "min_cosine": None},
}


class EncoderAccuracyError(NatureLMEdgeError):
    """The encoder, as opened on this device, is outside its tolerance against the reference."""


@dataclass(frozen=True)
class CheckResult:
    precision: str
    provider: str
    passed: bool
    mean_cosine: float
    min_cosine: float
    max_abs_error: float
    reference_max_abs: float
    finite: bool
    tolerance: dict
    failure: str | None
    cpu: dict
    cached: bool = False
    seconds: float = 0.0

    def line(self) -> str:
        """One line for the log, doctor, and the degraded reason."""
        figure = f"mean cosine {self.mean_cosine:.6f}, min {self.min_cosine:.6f}; CPU int8 kernel " \
                 f"{self.cpu.get('int8_kernel')}"
        where = f"{self.precision} audio encoder on {self.provider}"
        if self.passed:
            return f"{where}: within tolerance against the reference ({figure})"
        return f"{where} is outside its tolerance against the reference: {self.failure} ({figure})"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("precision", "provider", "passed", "mean_cosine", "min_cosine",
                                            "max_abs_error", "reference_max_abs", "finite", "tolerance", "failure",
                                            "cpu")}
        return json_safe(d)


def compare(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Errors of one output against the reference: max abs error, the reference's scale, per-embedding cosines.
    Shared by the workstation's verification (export/onnx_export.py) and the device's."""
    c = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    r = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    with np.errstate(all="ignore"):
        cos = (c * r).sum(-1) / np.maximum(np.linalg.norm(c, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
    finite = bool(np.isfinite(candidate).all())
    return {
        "max_abs_error": float(np.abs(c - r).max()) if finite else math.inf,
        "reference_max_abs": float(np.abs(r).max()),
        "mean_cosine": float(cos.mean()) if finite else -1.0,
        "min_cosine": float(cos.min()) if finite else -1.0,
        "finite": finite,
    }


def judge(per_input: list[tuple[dict, int]], tolerance: dict) -> dict:
    """Combine per-input comparisons (each with its number of embeddings) and judge them against `tolerance`
    ({"max_abs_error_relative_to_output_scale": bound or None, "mean_cosine", "min_cosine": bound or None})."""
    weight = sum(n for _, n in per_input)
    out = {
        "max_abs_error": max(m["max_abs_error"] for m, _ in per_input),
        "reference_max_abs": max(m["reference_max_abs"] for m, _ in per_input),
        "mean_cosine": sum(m["mean_cosine"] * n for m, n in per_input) / weight,
        "min_cosine": min(m["min_cosine"] for m, _ in per_input),
        "finite": all(m["finite"] for m, _ in per_input),
    }
    failure = None
    rel = tolerance.get("max_abs_error_relative_to_output_scale")
    bound = None if rel is None else rel * max(1.0, out["reference_max_abs"])
    if not out["finite"]:
        failure = "non-finite outputs (NaN or infinity)"
    elif bound is not None and out["max_abs_error"] > bound:
        failure = f"max abs error {out['max_abs_error']:.3g} > {bound:.3g}"
    elif out["mean_cosine"] < tolerance["mean_cosine"]:
        failure = f"mean cosine {out['mean_cosine']:.6f} < {tolerance['mean_cosine']}"
    elif tolerance.get("min_cosine") is not None and out["min_cosine"] < tolerance["min_cosine"]:
        failure = f"min cosine {out['min_cosine']:.6f} < {tolerance['min_cosine']}"
    out["passed"] = failure is None
    out["failure"] = failure
    return out


def load_verification(bundle) -> dict | None:
    """{"inputs": {name: array}, "references": {name: array}} from the bundle, or None for a bundle made before the
    device could check itself."""
    audio = bundle.section("audio")
    entry = audio.get("verification_data")
    if not entry:
        return None
    path = bundle.file(entry["file"])
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(entry["inputs"])
            return {"inputs": {n: z[f"input.{n}"] for n in names}, "references": {n: z[f"reference.{n}"] for n in names}}
    except (OSError, KeyError, ValueError) as e:
        raise BundleError(f"{path}: unreadable verification data ({e}); re-export the bundle") from None


def tolerance_for(bundle, precision: str) -> dict:
    entry = bundle.section("audio")["encoders"].get(precision, {})
    tol = (entry.get("verification") or {}).get("tolerance")
    if isinstance(tol, dict) and "mean_cosine" in tol:
        return {"max_abs_error_relative_to_output_scale": tol.get("max_abs_error_relative_to_output_scale"),
                "mean_cosine": float(tol["mean_cosine"]), "min_cosine": tol.get("min_cosine")}
    if precision in DEFAULT_TOLERANCES:
        return dict(DEFAULT_TOLERANCES[precision])
    raise BundleError(f"{bundle.path}: audio.encoders.{precision} records no tolerance; re-export the bundle")


def _cache_key(encoder) -> str:
    import onnxruntime

    sha = encoder.bundle.manifest["files"][encoder.file.name]["sha256"]
    parts = [str(CACHE_VERSION), sha, encoder.precision, encoder.provider, str(encoder.engine_cache_dir or ""),
             onnxruntime.__version__, cpu_info()["int8_kernel"]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def check_encoder(encoder, state_dir: Path | None = None, use_cache: bool = True) -> CheckResult | None:
    """Measure the opened encoder against the bundle's reference outputs (or reuse a cached measurement of the same
    file, precision, provider, engine, runtime and CPU path). None for a bundle without verification data."""
    bundle = encoder.bundle
    data = load_verification(bundle)
    if data is None:
        logger.warning("%s was exported before bundles carried verification data: the %s encoder cannot be checked "
                       "on this device (re-export it to enable the check)", bundle.path, encoder.precision)
        return None
    tolerance = tolerance_for(bundle, encoder.precision)
    cache = None
    if state_dir is not None:
        cache = Path(state_dir) / "selfcheck" / f"{_cache_key(encoder)}.json"
        if use_cache and cache.is_file():
            try:
                d = json.loads(cache.read_text())
                if d.get("tolerance") == json_safe(tolerance):
                    return CheckResult(**{**d, "cached": True})
            except (OSError, ValueError, TypeError):
                logger.info("%s: unreadable self-check cache, checking again", cache)
    t0 = time.perf_counter()
    per_input = []
    for name, x in data["inputs"].items():
        y = encoder.encode(x)
        ref = data["references"][name]
        if y.shape != ref.shape:
            raise BundleError(f"{encoder.file}: output shape {y.shape} on verification input {name!r}; the reference "
                              f"has {ref.shape}")
        per_input.append((compare(y, ref), y.shape[0] * y.shape[1]))
    j = judge(per_input, tolerance)
    result = CheckResult(precision=encoder.precision, provider=encoder.provider, passed=j["passed"],
                         mean_cosine=j["mean_cosine"], min_cosine=j["min_cosine"], max_abs_error=j["max_abs_error"],
                         reference_max_abs=j["reference_max_abs"], finite=j["finite"], tolerance=tolerance,
                         failure=j["failure"], cpu=cpu_info(), seconds=time.perf_counter() - t0)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(result.to_dict(), indent=1))
            os.replace(tmp, cache)
        except OSError as e:
            logger.warning("%s: cannot cache the encoder self-check (%s); it runs again at the next start",
                           cache, e.strerror)
    (logger.info if result.passed else logger.error)("encoder self-check: %s", result.line())
    return result


def json_safe(d):
    """Strict JSON (manifest, cache): infinities and NaN (a broken graph's figures) become null, at any depth."""
    if isinstance(d, dict):
        return {k: json_safe(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
