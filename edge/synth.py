"""Synthetic bird-like audio for the demo and tests: trills of frequency-modulated chirps over quiet forest noise.

Not a bird, but it has what a bioacoustic front end should see: tonal, harmonic, fast sweeps between 2 and 7 kHz,
repeated syllables and silence between phrases.
"""

from __future__ import annotations

import numpy as np


def birdsong(seconds: float = 12.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    out = 0.002 * rng.standard_normal(n)  # background: a quiet hiss (about -54 dBFS)
    t_phrase = 0.3
    while t_phrase < seconds - 0.5:
        f_lo = rng.uniform(2000, 3500)
        f_hi = f_lo + rng.uniform(1000, 3500)
        syllable = rng.uniform(0.05, 0.12)
        gap = rng.uniform(0.02, 0.06)
        count = int(rng.integers(4, 10))
        up = bool(rng.integers(0, 2))
        for k in range(count):
            start = t_phrase + k * (syllable + gap)
            if start + syllable >= seconds:
                break
            m = int(syllable * sample_rate)
            t = np.arange(m) / sample_rate
            f0, f1 = (f_lo, f_hi) if up else (f_hi, f_lo)
            phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * syllable))
            env = np.sin(np.pi * t / syllable) ** 2
            tone = np.sin(phase) + 0.3 * np.sin(2 * phase)  # a weak second harmonic
            i = int(start * sample_rate)
            out[i : i + m] += 0.25 * env * tone
        t_phrase += count * (syllable + gap) + rng.uniform(0.4, 1.2)
    return np.clip(out, -1.0, 1.0).astype(np.float32)
