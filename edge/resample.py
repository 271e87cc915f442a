"""The reference's resampler in numpy: a Hann-windowed sinc, polyphase, as torchaudio.functional.resample computes it
with its defaults (lowpass_filter_width 6, rolloff 0.99), which NatureLM's processor uses.

Why not only a general-purpose resampler such as libsoxr: NatureLM was trained on audio that went through this
filter, which rolls off from 6 kHz (-1.8 dB at 7 kHz, -5.9 dB at 7.9 kHz) and lets 8-9 kHz alias back. soxr is flatter
and alias-free, which moves the top ~14 of the 128 mel bins (6-8 kHz, where much birdsong lives) by up to 0.5
normalised units for 44.1/48 kHz input: the model would see a different spectrum than it was trained on. With this
filter the device's features match the reference to float32 rounding at every integer rate. (soxr stays available as
`resampler: soxr` for non-integer rates and for those who prefer it.)

Cost: one (blocks x taps) @ (taps x phases) product; for 10 s at 48 kHz about 0.5 M multiply-adds, at 44.1 kHz 76 M.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def _kernel(orig: int, new: int, width: int, rolloff: float) -> tuple[np.ndarray, int]:
    """(taps, new) polyphase filter matrix and the one-sided reach `pad` in input samples, for a reduced ratio."""
    cutoff = min(orig, new) * rolloff
    pad = math.ceil(width * orig / cutoff)
    taps = np.arange(-pad, pad + orig, dtype=np.float64) / orig
    phases = -np.arange(new, dtype=np.float64)[:, None] / new
    t = np.clip((phases + taps) * cutoff, -width, width)
    taper = np.cos(t * math.pi / (2 * width)) ** 2
    t = t * math.pi
    safe = np.where(t == 0, 1.0, t)
    sinc = np.where(t == 0, 1.0, np.sin(safe) / safe)
    kernel = (sinc * taper * (cutoff / orig)).T.astype(np.float32)  # (taps, new)
    kernel.setflags(write=False)
    return kernel, pad


def sinc_resample(x: np.ndarray, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                  rolloff: float = 0.99) -> np.ndarray:
    """Resample mono float32 `x` from `orig_freq` to `new_freq` (positive integers). Output length
    ceil(len(x) * new / orig), as the reference."""
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq == new_freq:
        return np.asarray(x, dtype=np.float32)
    g = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // g, new_freq // g
    kernel, pad = _kernel(orig, new, lowpass_filter_width, rolloff)
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    padded = np.concatenate([np.zeros(pad, np.float32), x, np.zeros(pad + orig, np.float32)])
    blocks = (padded.shape[0] - kernel.shape[0]) // orig + 1
    frames = np.lib.stride_tricks.as_strided(padded, shape=(blocks, kernel.shape[0]),
                                             strides=(orig * padded.strides[0], padded.strides[0]), writeable=False)
    out = (frames @ kernel).reshape(-1)
    return out[: -(-new * n // orig)]
