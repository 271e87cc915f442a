"""The device's audio front end: any recording in, the BEATs encoder's input features out.

It does what NatureLM's processor and BEATs' preprocess do together, in their order: mono by averaging channels,
resampling to the model rate, truncation to the clip length, right zero-padding, clamping to [-1, 1], Kaldi log-mel
fbank, fixed normalisation. Resampling uses the filter the bundle's manifest names: upstream's, resampy's
`kaiser_best` (edge/resample.py, the same filter and interpolation in numpy, at any rate), or, for a bundle made before
manifests named it, torchaudio's windowed sinc, which that bundle keeps (with a warning, once, that it is not
upstream's). `resampler="soxr"` (libsoxr "HQ") is the alternative. tests/test_frontend.py and tests/test_resample.py
measure them against the reference and against resampy itself.

Bad input is reported as an AudioError with a one-line message naming the problem and, where the caller gives one,
the source; a clip too short for even one fbank frame is refused rather than padded into a silent clip.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import soxr

from edge.errors import AudioError
from edge.fbank import fbank_features
from edge.resample import resampy_resample, sinc_resample
from edge.spec import RESAMPLER, FbankSpec, ResamplerSpec, WindowedSincSpec

__all__ = ["AudioFrontEnd"]

logger = logging.getLogger(__name__)

#: Sample rates the front end takes. Below 1 kHz there is nothing of the 0-8 kHz band the model hears; far above, the
#: rate is a mistake (a value in mHz, a frame count), and a resampling ratio of millions would allocate gigabytes.
MIN_RATE_HZ = 1000
MAX_RATE_HZ = 1_000_000
#: Samples beyond this magnitude (full scale is 1) are clipped to it on the way in: garbage either way, and float32
#: sums of them (the channel mean, the resampler's taps) would overflow to inf and then NaN. Nothing audio-like is
#: changed: the clip is clamped to [-1, 1] anyway, after resampling.
_MAX_ABS_SAMPLE = 1e6
#: The legacy sinc resampler's polyphase kernel has (orig + 2 * reach) x new entries for the reduced ratio orig:new; a rate
#: that reduces to nothing small (44101:16000) would need gigabytes. Such rates go to soxr, as non-integer rates do.
_SINC_MAX_KERNEL = 4_000_000

#: A bundle that records the legacy filter is said once per process, not once per window or worker.
_warned_legacy = False

# Past the clip's end, keep this much input before resampling. The filters reach a few milliseconds; anything
# further out cannot change the samples that survive truncation, and a long recording is not resampled in full.
_RESAMPLE_MARGIN_SECONDS = 1.0


def _source(name: str | None) -> str:
    return f" {str(name)!r}" if name is not None else ""


def _seconds_below(seconds: float, limit: float) -> str:
    # Enough decimals that a clip just short of the minimum does not print as the minimum itself.
    for decimals in range(3, 7):
        text = f"{seconds:.{decimals}f}"
        if float(text) < limit:
            return text
    return repr(seconds)


class AudioFrontEnd:
    """Turns audio at any sample rate into the normalised fbank features of one clip of `clip_seconds`.

    `spec` comes from the bundle's manifest (FbankSpec.from_dict(manifest["fbank"])), and `sinc`, the resampling
    filter, from its `audio.resampler` (edge.spec.resampler_from_dict), so a bundle exported with other parameters is
    still fed what its encoder expects. `resampler="soxr"` replaces the filter by libsoxr.
    """

    RESAMPLERS = ("sinc", "soxr")

    def __init__(self, spec: FbankSpec, clip_seconds: float, resampler: str = "sinc",
                 sinc: ResamplerSpec | WindowedSincSpec = RESAMPLER):
        global _warned_legacy
        if resampler not in self.RESAMPLERS:
            raise ValueError(f"resampler must be one of {', '.join(self.RESAMPLERS)}, got {resampler!r}")
        if not isinstance(sinc, (ResamplerSpec, WindowedSincSpec)):
            raise TypeError(f"unknown resampler {sinc!r} (this naturelm-edge knows resampy and windowed_sinc)")
        if isinstance(sinc, WindowedSincSpec) and resampler == "sinc" and not _warned_legacy:
            logger.warning("this bundle resamples with torchaudio's windowed sinc (its manifest's audio.resampler, or "
                           "none: made before naturelm-edge recorded resampy's); upstream NatureLM-audio uses resampy's "
                           "kaiser_best, which differs above 6.5 kHz. Rebuild the bundle (naturelm-edge build) to "
                           "hear what upstream hears.")
            _warned_legacy = True
        self.resampler = resampler
        self.sinc = sinc
        self._warned_fractional = False
        if not (isinstance(clip_seconds, (int, float)) and math.isfinite(clip_seconds) and clip_seconds > 0):
            raise ValueError(f"clip_seconds must be a positive number, got {clip_seconds!r}")
        self.spec = spec
        self.clip_seconds = float(clip_seconds)
        self.clip_samples = round(spec.sample_rate * clip_seconds)
        # A clip must fill at least one fbank frame at the model rate; anything shorter carries no usable sound.
        self.min_samples = spec.window_size
        if self.clip_samples < self.min_samples:
            raise ValueError(f"clip_seconds={clip_seconds} is shorter than one fbank frame")

    @property
    def num_frames(self) -> int:
        """Fbank frames per clip (998 for 10 s at 16 kHz)."""
        return self.spec.num_frames(self.clip_samples)

    def _check_rate(self, sample_rate, name: str | None) -> float:
        ok = isinstance(sample_rate, (int, float, np.integer, np.floating)) and not isinstance(sample_rate, bool)
        of = f" of{_source(name)}" if name is not None else ""
        if ok:
            try:
                rate = float(sample_rate)
            except OverflowError:  # an int beyond float's range
                rate = math.inf
        if not ok or not math.isfinite(rate) or rate <= 0:
            shown = repr(sample_rate) if len(repr(sample_rate)) <= 40 else repr(sample_rate)[:37] + "..."
            raise AudioError(f"sample rate{of} is {shown}; it must be a positive number of Hz")
        if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
            raise AudioError(f"sample rate{of} is {rate:g} Hz; the front end takes {MIN_RATE_HZ} Hz to "
                             f"{MAX_RATE_HZ / 1e6:g} MHz")
        return rate

    def _as_mono(self, audio, name: str | None) -> np.ndarray:
        """Validated mono float32 samples, non-finite samples zeroed."""
        src = _source(name)
        try:
            x = np.asarray(audio)
        except (ValueError, TypeError) as e:  # a ragged list, or something that is not an array at all
            raise AudioError(f"audio{src} is not an array of samples ({str(e).splitlines()[0]})") from None
        if x.ndim not in (1, 2):
            raise AudioError(
                f"audio{src} has {x.ndim} dimensions (shape {x.shape}); expected (samples,) or (samples, channels)"
            )
        if x.size == 0:
            raise AudioError(f"audio{src} is empty (shape {x.shape}, no samples)")
        if x.ndim == 2 and x.shape[1] > x.shape[0]:
            # soundfile and sounddevice give channels last; more channels than samples means the caller transposed.
            raise AudioError(
                f"audio{src} has shape {x.shape}, more channels than samples; "
                "expected channels last, (samples, channels)"
            )

        # By kind, not by subtype: numpy files timedelta64 under signedinteger.
        if x.dtype.kind == "f":
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: counted just below
                x = x.astype(np.float32, copy=False)
        elif x.dtype.kind == "i":
            # Integer PCM is full scale at 2**(bits - 1), as soundfile reads it into floats.
            x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
        elif x.dtype == np.uint8:
            x = (x.astype(np.float32) - 128.0) / 128.0
        else:
            raise AudioError(f"audio{src} has samples of type {x.dtype}; expected float or integer PCM")

        bad = ~np.isfinite(x)
        num_bad = int(np.count_nonzero(bad))
        if num_bad == x.size:
            raise AudioError(f"audio{src} has no finite samples (all {num_bad} are NaN or infinite)")
        if num_bad:
            logger.warning("audio%s: replaced %d NaN or infinite samples (of %d) with 0", src, num_bad, x.size)
            x = np.where(bad, np.float32(0.0), x)
        if float(np.max(np.abs(x))) > _MAX_ABS_SAMPLE:
            logger.warning("audio%s: samples up to %.3g clipped to %g (full scale is 1)", src,
                           float(np.max(np.abs(x))), _MAX_ABS_SAMPLE)
            x = np.clip(x, -_MAX_ABS_SAMPLE, _MAX_ABS_SAMPLE)  # a copy: never the caller's array

        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _resample(self, mono: np.ndarray, rate: float, name: str | None) -> np.ndarray:
        if rate != self.spec.sample_rate:
            if self.resampler == "sinc" and isinstance(self.sinc, ResamplerSpec):
                # float64 as upstream (soundfile's default); ~2x the float32 cost, a few ms a window, for parity with
                # resampy to ~1e-15 instead of ~1e-6.
                f = self.sinc
                mono = resampy_resample(mono, rate, self.spec.sample_rate, num_zeros=f.num_zeros,
                                        precision=f.precision, rolloff=f.rolloff, beta=f.beta, dtype=np.float64)
            elif self.resampler == "sinc" and rate == int(rate) and self._sinc_fits(int(rate)):
                mono = sinc_resample(mono, int(rate), self.spec.sample_rate, self.sinc.lowpass_filter_width,
                                     self.sinc.rolloff)
            else:
                if self.resampler == "sinc" and not self._warned_fractional:
                    why = "is not an integer" if rate != int(rate) else "has no small ratio to the model rate"
                    logger.warning("sample rate %s Hz %s: resampling with soxr instead of the bundle's windowed sinc "
                                   "filter (features above 6 kHz differ slightly)", rate, why)
                    self._warned_fractional = True
                mono = soxr.resample(mono, rate, self.spec.sample_rate, quality="HQ")
        if mono.shape[0] < self.min_samples:
            sr = self.spec.sample_rate
            minimum = self.min_samples / sr
            raise AudioError(
                f"clip{_source(name)} is {_seconds_below(mono.shape[0] / sr, minimum)} s long; the minimum is "
                f"{minimum:.3f} s (one {self.spec.frame_length_ms:g} ms fbank frame)"
            )
        return np.asarray(mono, dtype=np.float32)

    def _sinc_fits(self, rate: int) -> bool:
        g = math.gcd(rate, self.spec.sample_rate)
        orig, new = rate // g, self.spec.sample_rate // g
        reach = math.ceil(self.sinc.lowpass_filter_width * orig / (min(orig, new) * self.sinc.rolloff))
        return (orig + 2 * reach) * new <= _SINC_MAX_KERNEL

    def to_model_rate(self, audio: np.ndarray, sample_rate: int, name: str | None = None) -> np.ndarray:
        """Mono float32 samples at the model rate, (N,), from (N,) or (N, channels) audio at `sample_rate`.

        Channels are averaged, as the reference does; NaN/inf samples among finite ones become 0 (with a warning).
        Raises AudioError for empty, all-NaN, wrongly shaped or too-short audio and non-positive sample rates.
        """
        rate = self._check_rate(sample_rate, name)
        return self._resample(self._as_mono(audio, name), rate, name)

    def clip_waveform(self, audio: np.ndarray, sample_rate: int, name: str | None = None) -> np.ndarray:
        """The clip as the reference feeds it to BEATs: (clip_samples,) float32 at the model rate, truncated or
        right zero-padded to clip_seconds, then clamped to [-1, 1]."""
        rate = self._check_rate(sample_rate, name)
        mono = self._as_mono(audio, name)
        keep = math.ceil((self.clip_seconds + _RESAMPLE_MARGIN_SECONDS) * rate)
        mono = self._resample(mono[:keep], rate, name)
        clip = np.zeros(self.clip_samples, dtype=np.float32)
        n = min(mono.shape[0], self.clip_samples)
        clip[:n] = mono[:n]
        # Clamped after resampling, as in the reference: resampler overshoot on full-scale audio is clipped too.
        np.clip(clip, -1.0, 1.0, out=clip)
        return clip

    def features(self, audio: np.ndarray, sample_rate: int, name: str | None = None) -> np.ndarray:
        """Normalised log-mel features of one clip, (1, num_frames, num_mel_bins) float32, ready for the encoder."""
        return fbank_features(self.clip_waveform(audio, sample_rate, name), self.spec)[np.newaxis]
