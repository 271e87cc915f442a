"""Kaldi-compatible log-mel filterbank in numpy: BEATs' input features, computed on the device.

This is the same arithmetic as torchaudio.compliance.kaldi.fbank with the parameters of an `edge.spec.FbankSpec`
(read from the bundle's manifest), so that the ONNX encoder, exported without its FFT, sees the features it was
trained on. export/fbank.py holds the torch oracle it is tested against, and kaldi-native-fbank is the independent
check on both.

It runs once per 10 s window, so the window and the mel filterbank are built once per spec and cached. The sums run
in float64: on the device it costs a few milliseconds per window, and it keeps the result independent of whether
numpy's FFT works in float32 (numpy >= 2) or upcasts (numpy 1.x, as on JetPack).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from edge.blas import matmul_rows
from edge.spec import FbankSpec

__all__ = ["analysis_window", "fbank_features", "fft_length", "log_mel_fbank", "mel_filterbank", "normalize_fbank"]

# Kaldi floors filterbank energies at numeric_limits<float>::epsilon() before taking the log.
_LOG_FLOOR = float(np.finfo(np.float32).eps)


class _Tables(NamedTuple):
    n_fft: int
    window: np.ndarray  # (window_size,) float64
    mel_t: np.ndarray  # (n_fft // 2 + 1, num_mel_bins) float64, transposed for frames @ mel_t


def fft_length(spec: FbankSpec) -> int:
    """FFT length: the frame padded to the next power of two when the spec asks for it, as Kaldi does."""
    n = spec.window_size
    if spec.round_to_power_of_two:
        return 1 << (n - 1).bit_length()
    if n % 2:
        raise ValueError(f"an odd FFT length ({n}) is not supported; set round_to_power_of_two")
    return n


def _window(spec: FbankSpec) -> np.ndarray:
    n = spec.window_size
    # Symmetric windows (period n - 1), as Kaldi's FeatureWindowFunction builds them.
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(n) / (n - 1))
    if spec.window_type == "povey":
        return hann**0.85
    if spec.window_type == "hanning":
        return hann
    if spec.window_type == "hamming":
        return 0.54 - 0.46 * np.cos(2.0 * math.pi * np.arange(n) / (n - 1))
    if spec.window_type == "rectangular":
        return np.ones(n)
    raise ValueError(f"window type {spec.window_type!r} is not supported")


def mel_scale(hz):
    """Kaldi's mel scale (natural log, 1127 x ln(1 + f / 700)), float64."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_edges(spec: FbankSpec) -> np.ndarray:
    """The num_mel_bins + 2 edges of the triangular filters, equally spaced in mel from low_freq to the high edge
    (high_freq, or Nyquist plus a non-positive high_freq): filter b spans edges b .. b + 2, peaking at b + 1."""
    nyquist = 0.5 * spec.sample_rate
    high = spec.high_freq if spec.high_freq > 0.0 else nyquist + spec.high_freq
    if not 0.0 <= spec.low_freq < high <= nyquist:
        raise ValueError(f"mel range [{spec.low_freq}, {high}] Hz does not fit in [0, {nyquist}] Hz")
    mel_low, mel_high = mel_scale(spec.low_freq), mel_scale(high)
    return mel_low + (mel_high - mel_low) / (spec.num_mel_bins + 1) * np.arange(spec.num_mel_bins + 2)


def _mel_matrix(spec: FbankSpec, n_fft: int) -> np.ndarray:
    edges = mel_edges(spec)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    # Kaldi leaves the Nyquist bin out of every filter.
    fft_mel = mel_scale(np.arange(n_fft // 2 + 1) * (spec.sample_rate / n_fft))[None, :]
    weights = np.maximum(0.0, np.minimum((fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)))
    weights[:, -1] = 0.0
    return weights


@functools.lru_cache(maxsize=8)
def _tables(spec: FbankSpec) -> _Tables:
    # Dither would need a random source and snip_edges=False reflected edges; BEATs uses neither, and silently
    # ignoring them would give features the model was not trained on.
    if spec.dither != 0.0:
        raise ValueError(f"dither={spec.dither} is not supported (BEATs uses no dither)")
    if not spec.snip_edges:
        raise ValueError("snip_edges=False is not supported (BEATs uses snip_edges=True)")
    if spec.window_size < 2 or spec.window_shift < 1:
        raise ValueError(f"frame of {spec.window_size} samples and shift of {spec.window_shift} are not usable")
    n_fft = fft_length(spec)
    window = _window(spec)
    mel_t = np.ascontiguousarray(_mel_matrix(spec, n_fft).T)
    # The cache hands out the same arrays to every caller: make accidental in-place edits fail loudly.
    window.flags.writeable = False
    mel_t.flags.writeable = False
    return _Tables(n_fft, window, mel_t)


def mel_filterbank(spec: FbankSpec) -> np.ndarray:
    """The (num_mel_bins, n_fft // 2 + 1) triangular filters (read-only, cached)."""
    return _tables(spec).mel_t.T


def analysis_window(spec: FbankSpec) -> np.ndarray:
    """The (window_size,) analysis window (read-only, cached)."""
    return _tables(spec).window


def log_mel_fbank(waveform: np.ndarray, spec: FbankSpec) -> np.ndarray:
    """Raw Kaldi log-mel filterbank of a 1-D waveform in [-1, 1]: (spec.num_frames(N), num_mel_bins) float32.

    The waveform is scaled by `spec.waveform_scale` first, as BEATs does. A waveform shorter than one frame gives an
    empty (0, num_mel_bins) result.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {x.shape}")
    tables = _tables(spec)
    num_frames = spec.num_frames(x.shape[0])
    if num_frames == 0:
        return np.zeros((0, spec.num_mel_bins), dtype=np.float32)

    x = x.astype(np.float64) * spec.waveform_scale
    frames = np.lib.stride_tricks.sliding_window_view(x, spec.window_size)[:: spec.window_shift][:num_frames]
    if spec.remove_dc_offset:
        frames = frames - frames.mean(axis=1, keepdims=True)
    else:
        frames = frames.copy()
    if spec.preemphasis != 0.0:
        # The right-hand side is a temporary taken before the subtraction, so each sample sees its unmodified
        # predecessor; the first sample of a frame has none inside the frame and is set against itself, as in Kaldi.
        frames[:, 1:] -= spec.preemphasis * frames[:, :-1]
        frames[:, 0] *= 1.0 - spec.preemphasis
    frames *= tables.window

    spectrum = np.fft.rfft(frames, n=tables.n_fft, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    if not spec.use_power:
        power = np.sqrt(power)
    energies = matmul_rows(power, tables.mel_t)  # on this thread: see edge/blas.py
    np.maximum(energies, _LOG_FLOOR, out=energies)
    return np.log(energies).astype(np.float32)


def normalize_fbank(fbank: np.ndarray, spec: FbankSpec) -> np.ndarray:
    """BEATs' fixed normalisation, (fbank - mean) / (2 * std), in float32."""
    return ((np.asarray(fbank, dtype=np.float32) - spec.norm_mean) / (2.0 * spec.norm_std)).astype(np.float32)


def fbank_features(waveform: np.ndarray, spec: FbankSpec) -> np.ndarray:
    """Normalised log-mel features of a 1-D waveform in [-1, 1]: (frames, num_mel_bins) float32."""
    return normalize_fbank(log_mel_fbank(waveform, spec), spec)
