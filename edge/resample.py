"""Resampling to the model rate as NatureLM-audio does it: resampy's `kaiser_best` filter and interpolation, in numpy.

Upstream (NatureLM-audio v1.0.2, `NatureLM/processors.py`) calls `resampy.resample(audio, sr, 16000)`, whose default
filter is `kaiser_best`: a sinc windowed by a Kaiser window (beta 12.9846, 50 zero crossings, roll-off 0.9173 of the
lower Nyquist rate), tabulated at 2**13 points per zero crossing and read with linear interpolation between table
entries. That filter is flat to ~6.5 kHz, -14 dB at 7.5 kHz, -49 dB at 7.8 kHz and keeps 8.5-9 kHz from aliasing below
8 kHz (< -88 dB), where torchaudio's windowed sinc (this module's earlier filter) let them through at -11 to -17 dB.
Birds sing there, so the device must hear what upstream hears.

`resampy_resample` reproduces resampy.interpn's loop, including its quirks: the table stride is `int(scale * 2**13)`
(truncated, so the filter is read at slightly compressed positions), one interpolation factor per wing of each output
sample, the output length `int(n * new / orig)`, and output times `t * (orig / new)` in floating point (which for some
rates land a hair below an integer and so take the neighbouring phase). Outputs of a rational ratio new:orig = U:D
repeat their filter every U outputs, so the work is matrix products per window against a band matrix of precomputed
taps (built on the first call for an input length and kept: the front end's windows have one length), ~65 M
multiply-adds for 10 s at 44.1 or 48 kHz, a few ms on one core;
outputs whose floating-point time broke the pattern, and rates without a small ratio, are computed per output from
their own taps. Against resampy 0.4.3 (tests/test_resample.py) the difference is ~1e-11 of full scale when computing
in float64 (the device's choice, as upstream resamples soundfile's float64) and ~1e-6 in float32.

The filter table is regenerated from its parameters with numpy (np.i0, np.sinc: resampy's own `sinc_window` with
a Kaiser window); a test checks it equals the `kaiser_best.npz` that resampy ships, to 1.5e-15. Beta is not
published beyond 6 digits (12.9846); 12.984585247039956 is fitted to the shipped table.

Why not resampy itself on the device. It needs numba and llvmlite; both publish aarch64 wheels for CPython 3.10
(numba 0.60 / llvmlite 0.43 resolve for manylinux2014_aarch64 cp310), so it would install on a Jetson. But numba
compiles resampy's loop on first use in every process, and LLVM stays resident. Measured here (benchmarks/
bench_resample.py, results/resample.json; x86-64, 2 shared cores, numba 0.68): `import resampy` 0.3-0.6 s and its
first call 1.2-3.1 s, resident memory 52 -> 145 MB after the import and 198 MB after the first call, and then 154 ms
per 10 s window at 48 kHz (its loop is scalar); this module imports in 0.002 s, its first call (building the table)
takes 0.05-0.2 s, resident memory grows by ~18 MB, and a window takes 5 ms in float64 (2 ms in float32), 1.7% of
the small preset's int8 encoder. Installed, llvmlite and numba are ~210 MB. On a board where the daemon restarts
under systemd and `infer` runs per batch, seconds of JIT on each start and 150 MB beside the model cost more than the
~200 lines here. resampy stays in the `dev` extra, as the oracle.

The torchaudio-style windowed sinc (`sinc_resample`) stays for bundles made before the manifest named resampy's
filter: such a bundle keeps the filter its manifest records, so that its answers do not change under a software
update (edge/frontend.py logs once that it differs from upstream).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

from edge.blas import rows_per_product

__all__ = ["kaiser_filter", "resampy_output_length", "resampy_resample", "sinc_resample"]

#: Largest number of distinct output phases (U of the reduced ratio U:D) for which the block product is used; beyond
#: it (a rate such as 44101 Hz) the taps are gathered per output: exact as well, ~20x slower.
_MAX_PHASES = 4096
#: Elements of one gathered (outputs x taps) chunk in the per-output path: bounds its memory to ~16 MB.
_GATHER_ELEMENTS = 2_000_000


@lru_cache(maxsize=4)
def kaiser_filter(num_zeros: int, precision: int, rolloff: float, beta: float) -> np.ndarray:
    """The right wing of resampy's Kaiser-windowed sinc (resampy.filters.sinc_window with a Kaiser window), float64,
    num_zeros * 2**precision + 1 points: entry j is the filter at j / 2**precision zero crossings."""
    n = num_zeros * 2**precision
    sinc = rolloff * np.sinc(rolloff * np.linspace(0, num_zeros, num=n + 1, endpoint=True))
    # np.kaiser(2n + 1, beta)[n:] computed on the right half only: the same expression, elementwise identical.
    r = np.arange(n + 1, dtype=np.float64) / n
    win = np.i0(beta * np.sqrt(1.0 - r**2)) / np.i0(float(beta)) * sinc
    win.setflags(write=False)
    return win


def resampy_output_length(num_samples: int, orig_freq: float, new_freq: float) -> int:
    """Samples resampy returns for `num_samples` inputs (it truncates, where torchaudio rounds up)."""
    return int(num_samples * float(new_freq) / float(orig_freq))


class _Plan:
    """Where resampy's loop reads the filter for each output sample, for one input length and ratio."""

    def __init__(self, n_in: int, orig_freq: float, new_freq: float, table: np.ndarray, num_table: int):
        ratio = float(new_freq) / orig_freq
        self.n_in = n_in
        self.n_out = resampy_output_length(n_in, orig_freq, new_freq)
        self.scale = min(1.0, ratio)
        # resampy scales its table by the ratio when downsampling and differentiates the scaled table; the two are
        # formed on the fly at the positions read (_taps), in the same floating-point operations.
        self.table = table
        self.gain = ratio if ratio < 1 else None
        self.step = int(self.scale * num_table)
        self.num_table = num_table
        t_out = np.arange(self.n_out) * (1.0 / ratio)
        self.n = t_out.astype(np.int64)  # t_out >= 0: truncation is floor, as int() in resampy
        frac = self.scale * (t_out - self.n)
        self.off_l, self.eta_l = self._split(frac)
        self.off_r, self.eta_r = self._split(self.scale - frac)
        nwin = table.shape[0]
        # Taps per wing before the signal's ends cut them: resampy's (nwin - offset) // index_step.
        self.taps_l = (nwin - self.off_l) // self.step
        self.taps_r = (nwin - self.off_r) // self.step
        self.reach_l = int(self.taps_l.max()) if self.n_out else 0
        self.reach_r = int(self.taps_r.max()) if self.n_out else 0

    def _split(self, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = frac * self.num_table
        offset = index.astype(np.int64)
        return offset, index - offset

    def _taps(self, pos: np.ndarray, eta: np.ndarray) -> np.ndarray:
        last = self.table.shape[0] - 1
        here, after = self.table[pos], self.table[np.minimum(pos + 1, last)]
        if self.gain is not None:
            here, after = self.gain * here, self.gain * after
        return here + eta * (after - here)

    def weights(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), reach_l + reach_r) float64 taps of outputs `idx`: column c weighs input n - (reach_l - 1) + c."""
        w = np.zeros((idx.shape[0], self.reach_l + self.reach_r))
        for left, off, eta, taps, width in ((True, self.off_l, self.eta_l, self.taps_l, self.reach_l),
                                            (False, self.off_r, self.eta_r, self.taps_r, self.reach_r)):
            i = np.arange(width)
            valid = i < taps[idx, None]
            pos = np.where(valid, off[idx, None] + i * self.step, 0)
            vals = np.where(valid, self._taps(pos, eta[idx, None]), 0.0)
            if left:
                w[:, :width] = vals[:, ::-1]  # tap i weighs input n - i
            else:
                w[:, self.reach_l:] = vals  # tap k weighs input n + 1 + k
        return w


class _Kernel:
    """resampy's resampling of inputs of one length, as matrix products over blocks of outputs.

    For a ratio new:orig = U:D in lowest terms, output t = U*m + p ideally reads the inputs around n_p + D*m with the
    filter of phase p. `group` periods make one block of G*U outputs whose inputs start G*D samples after the previous
    block's, so all blocks share one (span x G*U) band matrix of taps: block outputs = X @ W with X[m] the span of
    inputs from block m's first tap. X is a strided view of the input (row stride G*D, no copy); the product is cut
    into pieces that skip the band's zeros and are at most G*D columns wide (a view BLAS takes without copying), in
    row chunks small enough to run on the calling thread (edge/blas.py). Outputs whose floating-point time broke the
    period (resampy computes t * (orig / new), which for some t lands just below an integer) are computed one by one
    from their own taps.
    """

    def __init__(self, n_in: int, orig_freq: float, new_freq: float, table: np.ndarray, num_table: int,
                 ratio: tuple[int, int] | None, dtype):
        plan = _Plan(n_in, orig_freq, new_freq, table, num_table)
        self.dtype = np.dtype(dtype)
        self.n_out = plan.n_out
        self.pad_l = plan.reach_l  # input j sits at padded index j + pad_l
        self.pad_r = plan.reach_r + 1
        self.rows = 0
        done = np.zeros(self.n_out, dtype=bool)
        if ratio is not None and self.n_out:
            done = self._blocks(plan, *ratio)
        self.rest = np.flatnonzero(~done)
        # Output t's taps start at padded index n_t + 1 (column c weighs input n_t - reach_l + 1 + c).
        self.rest_start = plan.n[self.rest] + 1
        self.width = plan.reach_l + plan.reach_r
        # A few stray outputs keep their taps; a rate without a small ratio keeps the plan and forms them per chunk.
        small = self.rest.size * self.width <= _GATHER_ELEMENTS
        self.rest_weights = plan.weights(self.rest).astype(self.dtype) if small else None
        self.plan = None if small else plan

    def _blocks(self, plan: _Plan, up: int, down: int) -> np.ndarray:
        taps = plan.reach_l + plan.reach_r
        # Rows of about a third of the filter's reach: few slices W_s (3-4), and little of each slice is zero.
        group = max(1, round(taps / (3 * down)))
        group = min(group, max(1, self.n_out // up))
        outs, ins = group * up, group * down
        rows = self.n_out // outs
        if rows == 0:
            return np.zeros(self.n_out, dtype=bool)
        p = np.arange(outs)
        base_n = plan.n[p]
        t = np.arange(rows * outs)
        same = ((plan.n[t] - (t // outs) * ins == base_n[t % outs])
                & (plan.off_l[t] == plan.off_l[t % outs]) & (plan.off_r[t] == plan.off_r[t % outs]))
        w = np.zeros((int(base_n[-1] - base_n[0]) + taps, outs))
        tap_rows = plan.weights(p)
        for j in range(outs):
            a = int(base_n[j] - base_n[0])
            w[a:a + taps, j] = tap_rows[j]
        # Cut the band matrix into products that read only its non-zero band: consecutive outputs in groups whose
        # inputs overlap (few zeros), each input range in pieces of at most `ins` columns, so that every piece is a
        # strided view of the input with a row stride of `ins` that BLAS takes as it is (no copy).
        per_group = max(1, min(outs, math.ceil(taps * up / (2 * down))))
        self.products = []
        for j0 in range(0, outs, per_group):
            j1 = min(outs, j0 + per_group)
            a0, a1 = int(base_n[j0] - base_n[0]), int(base_n[j1 - 1] - base_n[0]) + taps
            for c in range(a0, a1, ins):
                width = min(ins, a1 - c)
                self.products.append((c, width, j0, j1, np.ascontiguousarray(w[c:c + width, j0:j1], self.dtype)))
        self.rows, self.outs, self.ins = rows, outs, ins
        # Block m's first tap is at padded index base_n[0] + 1 + m * ins; the padding must hold every row read.
        self.start = int(base_n[0]) + 1
        self.pad_r = max(self.pad_r, self.start + (rows - 1) * ins + w.shape[0] - self.pad_l - plan.n_in)
        done = np.zeros(self.n_out, dtype=bool)
        done[: rows * outs] = same
        return done

    def __call__(self, x: np.ndarray) -> np.ndarray:
        padded = np.concatenate([np.zeros(self.pad_l, self.dtype), x, np.zeros(self.pad_r, self.dtype)])
        y = np.empty(self.n_out, dtype=self.dtype)
        if self.rows:
            out = y[: self.rows * self.outs].reshape(self.rows, self.outs)
            out[:] = 0
            base = padded[self.start:]
            item = base.strides[0]
            for c, width, j0, j1, w in self.products:
                view = np.lib.stride_tricks.as_strided(base[c:], shape=(self.rows, width),
                                                       strides=(self.ins * item, item), writeable=False)
                step = rows_per_product(width, j1 - j0)  # on this thread: see edge/blas.py
                for a in range(0, self.rows, step):
                    out[a:a + step, j0:j1] += view[a:a + step] @ w
        chunk = max(1, _GATHER_ELEMENTS // max(1, self.width))
        cols = np.arange(self.width)
        for a in range(0, self.rest.shape[0], chunk):
            idx = self.rest[a:a + chunk]
            if self.plan is None:
                w = self.rest_weights[a:a + chunk]
            else:
                w = self.plan.weights(idx).astype(self.dtype, copy=False)
            window = padded[self.rest_start[a:a + chunk, None] + cols]
            y[idx] = np.einsum("ij,ij->i", window, w)
        return y


@lru_cache(maxsize=8)
def _cached_kernel(n_in: int, orig_freq: float, new_freq: float, num_zeros: int, precision: int, rolloff: float,
                   beta: float, dtype: str) -> _Kernel:
    # Recordings are cut into windows of one length, so after the first window each call is only its products.
    table = kaiser_filter(num_zeros, precision, rolloff, beta)
    return _Kernel(n_in, orig_freq, new_freq, table, 2**precision, _small_ratio(orig_freq, new_freq), dtype)


def resampy_resample(x: np.ndarray, orig_freq: float, new_freq: float, *, num_zeros: int = 50, precision: int = 13,
                     rolloff: float = 0.9173473712608761, beta: float = 12.984585247039956,
                     dtype=np.float64) -> np.ndarray:
    """Resample mono `x` from `orig_freq` to `new_freq` Hz as `resampy.resample(x, orig, new)` does (by default with
    its `kaiser_best` filter), computing in `dtype` (float64 by default, as upstream resamples soundfile's float64;
    float32 is ~3x faster and within ~1e-6 of full scale). Returns resampy_output_length(len(x), orig, new) samples
    of `dtype`."""
    x = np.asarray(x).reshape(-1).astype(dtype, copy=False)
    if not (orig_freq > 0 and new_freq > 0):
        raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
    if float(orig_freq) == float(new_freq):
        return x.copy()
    kernel = _cached_kernel(x.shape[0], float(orig_freq), float(new_freq), int(num_zeros), int(precision),
                            float(rolloff), float(beta), np.dtype(dtype).name)
    return kernel(x)


def _small_ratio(orig_freq: float, new_freq: float) -> tuple[int, int] | None:
    """(U, D) with new/orig = U/D in lowest terms, when both rates are integers and U is small enough."""
    if orig_freq != int(orig_freq) or new_freq != int(new_freq):
        return None
    r = Fraction(int(new_freq), int(orig_freq))
    if r.numerator > _MAX_PHASES:
        return None
    return r.numerator, r.denominator


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
    """torchaudio.functional.resample's Hann-windowed sinc (its defaults), the filter of bundles made before the
    manifest named resampy's. Mono float32 `x` from `orig_freq` to `new_freq` (positive integers); output length
    ceil(len(x) * new / orig), as torchaudio."""
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
