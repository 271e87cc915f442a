"""The reference audio front end in plain torch: the oracle the device's numpy front end is tested against.

BEATs turns a clip into features with torchaudio.compliance.kaldi.fbank, and NatureLM's processor (v1.0.2) resamples
with resampy's `kaiser_best`. torchaudio is not a dependency of this project (it pins torch versions and drags in
media libraries), so the fbank is re-derived here from its definition (Kaldi's feature-fbank / mel-computations) with
torch ops. The resampler is edge/resample.py's numpy port of resampy, run in float64 as upstream runs it; it is
tested against resampy itself (tests/test_resample.py), which is not a dependency of the workstation side either
(it needs numba). torchaudio's windowed sinc (`sinc_resample`), the filter of bundles made before, stays for them.
This module favours being obviously right over being fast: it is only run on the workstation and in tests.

Every parameter comes from an `edge.spec.FbankSpec`; nothing about the fbank is written down here a second time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edge.resample import resampy_resample
from edge.spec import CLIP_SECONDS, FBANK, RESAMPLER, FbankSpec, ResamplerSpec, WindowedSincSpec

__all__ = [
    "feature_window",
    "kaldi_fbank",
    "mel_banks",
    "normalize_fbank",
    "padded_window_size",
    "reference_waveform",
    "sinc_resample",
]

# Kaldi floors filterbank energies at numeric_limits<float>::epsilon() before the log, whatever precision it runs in.
_LOG_FLOOR = float(torch.finfo(torch.float32).eps)

# The oracle computes in float64 so that its own rounding is far below that of the float32 implementations it judges
# (Kaldi, kaldi-native-fbank, torchaudio); it still returns float32 like they do.
_DTYPE = torch.float64


def _check_supported(spec: FbankSpec) -> None:
    # Dither draws random numbers and snip_edges=False reflects the signal at the ends; BEATs uses neither, and an
    # oracle that silently ignored them would "agree" with a wrong device implementation.
    if spec.dither != 0.0:
        raise ValueError(f"dither={spec.dither} is not supported (BEATs uses no dither)")
    if not spec.snip_edges:
        raise ValueError("snip_edges=False is not supported (BEATs uses snip_edges=True)")
    if spec.window_size < 2 or spec.window_shift < 1:
        raise ValueError(f"frame of {spec.window_size} samples and shift of {spec.window_shift} are not usable")
    if not 0.0 <= spec.preemphasis <= 1.0:
        raise ValueError(f"preemphasis {spec.preemphasis} is outside [0, 1]")


def padded_window_size(spec: FbankSpec = FBANK) -> int:
    """FFT length: the frame rounded up to a power of two when the spec asks for it, as Kaldi does."""
    n = spec.window_size
    if spec.round_to_power_of_two:
        return 1 << (n - 1).bit_length()
    if n % 2:
        raise ValueError(f"an odd FFT length ({n}) is not supported; set round_to_power_of_two")
    return n


def feature_window(spec: FbankSpec = FBANK) -> torch.Tensor:
    """Kaldi's analysis window of `spec.window_size` samples (float64)."""
    n = spec.window_size
    # Kaldi's windows are symmetric: the cosine's period is n - 1 samples, not n.
    a = 2.0 * math.pi / (n - 1)
    i = torch.arange(n, dtype=_DTYPE)
    kind = spec.window_type
    if kind == "povey":
        # A Hann window raised to 0.85: Kaldi's default, which, unlike Hamming, goes to zero at the edges.
        return (0.5 - 0.5 * torch.cos(a * i)).pow(0.85)
    if kind == "hanning":
        return 0.5 - 0.5 * torch.cos(a * i)
    if kind == "hamming":
        return 0.54 - 0.46 * torch.cos(a * i)
    if kind == "rectangular":
        return torch.ones(n, dtype=_DTYPE)
    raise ValueError(f"window type {kind!r} is not supported")


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_banks(spec: FbankSpec = FBANK) -> torch.Tensor:
    """Kaldi's triangular mel filters, shape (num_mel_bins, n_fft // 2 + 1), float64.

    The triangles are linear in mel, not in Hz, with edges equally spaced in mel between low_freq and high_freq.
    Kaldi only covers FFT bins 0 .. n_fft/2 - 1; the Nyquist bin's column is zero.
    """
    n_fft = padded_window_size(spec)
    nyquist = 0.5 * spec.sample_rate
    high = spec.high_freq if spec.high_freq > 0.0 else nyquist + spec.high_freq
    low = spec.low_freq
    if not 0.0 <= low < high <= nyquist:
        raise ValueError(f"mel range [{low}, {high}] Hz does not fit in [0, {nyquist}] Hz")

    mel_low = _mel(torch.tensor(low, dtype=_DTYPE))
    mel_high = _mel(torch.tensor(high, dtype=_DTYPE))
    # num_bins + 1 steps: the outermost triangles reach out to low and high with their outer edges.
    delta = (mel_high - mel_low) / (spec.num_mel_bins + 1)
    b = torch.arange(spec.num_mel_bins, dtype=_DTYPE).unsqueeze(1)
    left = mel_low + b * delta
    centre = left + delta
    right = left + 2.0 * delta

    bin_width = spec.sample_rate / n_fft
    mel = _mel(bin_width * torch.arange(n_fft // 2, dtype=_DTYPE)).unsqueeze(0)
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1))


def kaldi_fbank(waveform: torch.Tensor, spec: FbankSpec = FBANK) -> torch.Tensor:
    """Raw log-mel filterbank of a waveform in [-1, 1], as BEATs computes it.

    waveform: (N,) or (B, N) float. The `spec.waveform_scale` (2**15) scaling is applied here, as BEATs' preprocess
    does before calling Kaldi's fbank. Returns (B, T, num_mel_bins) float32 with T = spec.num_frames(N); a 1-D input
    gives B = 1. Clips shorter than one frame give T = 0.
    """
    _check_supported(spec)
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 2:
        raise ValueError(f"expected a (N,) or (B, N) waveform, got shape {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        raise TypeError(f"expected a floating-point waveform, got {waveform.dtype}")

    batch, num_samples = waveform.shape
    size, shift = spec.window_size, spec.window_shift
    num_frames = spec.num_frames(num_samples)
    if num_frames == 0:
        return torch.empty(batch, 0, spec.num_mel_bins, dtype=torch.float32)

    x = waveform.to(_DTYPE) * spec.waveform_scale
    # snip_edges: only frames that lie wholly inside the signal, the first starting at sample 0.
    frames = x.unfold(-1, size, shift)  # (B, T, size)

    if spec.remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if spec.preemphasis != 0.0:
        # Kaldi's first sample has no predecessor inside the frame and is pre-emphasised against itself.
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - spec.preemphasis * previous
    frames = frames * feature_window(spec)

    n_fft = padded_window_size(spec)
    spectrum = torch.fft.rfft(frames, n=n_fft, dim=-1).abs()
    if spec.use_power:
        spectrum = spectrum.pow(2)
    energies = spectrum @ mel_banks(spec).T
    return torch.clamp(energies, min=_LOG_FLOOR).log().to(torch.float32)


def normalize_fbank(fb: torch.Tensor, spec: FbankSpec = FBANK) -> torch.Tensor:
    """BEATs' fixed normalisation: (fbank - mean) / (2 * std)."""
    return (fb - spec.norm_mean) / (2.0 * spec.norm_std)


def sinc_resample(
    waveform: torch.Tensor, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Band-limited resampling of the last axis by a Hann-windowed sinc, as torchaudio.functional.resample does with
    its defaults (the reference's resampler).

    The ratio is reduced to lowest terms, and each of the `new` output phases gets its own FIR filter of
    2 * width + orig taps; a strided convolution applies them all at once. The cut-off is `rolloff` times the lower
    Nyquist rate; the sinc is truncated at `lowpass_filter_width` zero crossings and tapered by a Hann window. The
    output has ceil(N * new / orig) samples. Computes in the input's precision.
    """
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_freq} -> {new_freq}")
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // g, new_freq // g
    dtype = waveform.dtype

    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    # For output phase j (time -j/new relative to its input block) and input tap k (time k/orig), the filter is
    # evaluated at (k/orig - j/new) in units of the cut-off period.
    taps = torch.arange(-width, width + orig, dtype=dtype) / orig
    phases = -torch.arange(new, dtype=dtype).unsqueeze(1) / new
    t = ((phases + taps) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)
    taper = torch.cos(t * math.pi / (2 * lowpass_filter_width)) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = (sinc * taper * (cutoff / orig)).unsqueeze(1)  # (new, 1, taps)

    lead = waveform.shape[:-1]
    flat = waveform.reshape(-1, 1, waveform.shape[-1])
    length = flat.shape[-1]
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded, kernel, stride=orig)  # (B, new, blocks)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = -(-new * length // orig)
    return out[:, :target].reshape(*lead, -1)


def reference_waveform(
    audio: np.ndarray | torch.Tensor, sample_rate: int, spec: FbankSpec = FBANK, clip_seconds: float = CLIP_SECONDS,
    resampler: ResamplerSpec | WindowedSincSpec = RESAMPLER,
) -> torch.Tensor:
    """A clip as NatureLM's processor hands it to the model (NatureLMAudioProcessor.prepare_audio), float32.

    In its order: mono by averaging over the smaller axis (so (N, C) and (C, N) both work), resampling to the model
    rate, truncation to `clip_seconds`, right zero-padding to `clip_seconds`, clamping to [-1, 1]. The clamp comes
    last, so resampler overshoot is clipped too. Upstream resamples with `resampy.resample(audio, sr, 16000)`
    (kaiser_best) on soundfile's float64 samples: `resampler` (default) is that, in float64. A WindowedSincSpec gives
    torchaudio.functional.resample's defaults instead (`sinc_resample`, the processor before v1.0.1 and bundles made
    before they recorded resampy's filter; checked once against torchaudio 2.11 at 8 to 96 kHz: equal to 1e-15).
    """
    if isinstance(audio, torch.Tensor):
        x = audio.detach().to("cpu", torch.float64)
    else:
        x = torch.from_numpy(np.asarray(audio, dtype=np.float64))
    if x.dim() == 2:
        x = x.mean(dim=int(np.argmin(tuple(x.shape))))
    if x.dim() != 1:
        raise ValueError(f"expected (N,) or 2-D audio, got shape {tuple(x.shape)}")
    if sample_rate != spec.sample_rate:
        if isinstance(resampler, WindowedSincSpec):
            x = sinc_resample(x, sample_rate, spec.sample_rate, resampler.lowpass_filter_width, resampler.rolloff)
        else:
            x = torch.from_numpy(resampy_resample(
                x.numpy(), sample_rate, spec.sample_rate, num_zeros=resampler.num_zeros,
                precision=resampler.precision, rolloff=resampler.rolloff, beta=resampler.beta, dtype=np.float64))
    clip_samples = round(spec.sample_rate * clip_seconds)
    x = x[:clip_samples]
    x = torch.nn.functional.pad(x, (0, clip_samples - x.shape[0]))
    return x.clamp(-1.0, 1.0).to(torch.float32)
