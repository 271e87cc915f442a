"""The two fbanks (export/fbank.py in torch, edge/fbank.py in numpy) against each other and against
kaldi-native-fbank, an independent C++ implementation of Kaldi's compute-fbank-feats.

How the tolerances were found: both our implementations sum in float64, kaldi-native-fbank (like Kaldi and
torchaudio) in float32. Its rounding error in a power-spectrum bin is roughly eps * |loudest bin| in amplitude, so the
relative error of a bin grows as the square root of how far the bin lies below the frame's loudest one; float32 mel
weights add a little where a bin takes a strong peak through a small weight. Measured in log units (nats) on the
signals below: at most 9.3e-4 for bins within 10 or 15 nats (43 / 65 dB) of the frame's loudest, 4.7e-3 within
20 nats (87 dB), both on chirps; further down, float32 leaves only rounding noise (a pure tone's 128 bins span
45 nats, and there the error reaches 11). The floor at float32 eps makes bins with no energy agree exactly.
Broadband signals keep every bin within a few nats of the loudest and agree to 2.7e-4 (6e-4 with other seeds)
everywhere. The limits below are those with about 2x headroom.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from edge import fbank as edge_fbank
from edge.spec import CLIP_SAMPLES, FBANK, FbankSpec
from export import fbank as export_fbank

knf = pytest.importorskip("kaldi_native_fbank")

SR = FBANK.sample_rate
LOG_FLOOR = math.log(np.finfo(np.float32).eps)

# Bands of "nats below the frame's loudest mel bin" and the largest absolute log error allowed in each against
# kaldi-native-fbank (see the module docstring); bins further down than the last band are float32 noise in Kaldi.
KNF_BANDS = ((10.0, 2e-3), (15.0, 3e-3), (20.0, 1e-2))
# Broadband signals: every bin is compared.
KNF_BROADBAND_ATOL = 1e-3
# numpy vs torch, both float64 inside and rounded to float32 once at the end: a few float32 ulps of values up
# to ~35 (ulp 3.8e-6) would be 1e-5; seen 4.8e-7.
EDGE_VS_EXPORT_ATOL = 1e-5


def _mel(hz: float) -> float:
    return 1127.0 * math.log1p(hz / 700.0)


def _inv_mel(mel: float) -> float:
    return 700.0 * math.expm1(mel / 1127.0)


def _knf_one(x: np.ndarray, spec: FbankSpec) -> np.ndarray:
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq = spec.sample_rate
    fo.frame_length_ms = spec.frame_length_ms
    fo.frame_shift_ms = spec.frame_shift_ms
    fo.dither = spec.dither
    fo.preemph_coeff = spec.preemphasis
    fo.remove_dc_offset = spec.remove_dc_offset
    fo.window_type = spec.window_type
    fo.round_to_power_of_two = spec.round_to_power_of_two
    fo.snip_edges = spec.snip_edges
    opts.mel_opts.num_bins = spec.num_mel_bins
    opts.mel_opts.low_freq = spec.low_freq
    opts.mel_opts.high_freq = spec.high_freq
    opts.use_energy = False
    opts.use_power = spec.use_power
    opts.use_log_fbank = True
    online = knf.OnlineFbank(opts)
    online.accept_waveform(spec.sample_rate, (x.astype(np.float32) * spec.waveform_scale).tolist())
    online.input_finished()
    if online.num_frames_ready == 0:
        return np.zeros((0, spec.num_mel_bins), dtype=np.float32)
    return np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])


def _empty_mel_bins(spec: FbankSpec) -> list:
    return [int(b) for b in np.flatnonzero(export_fbank.mel_banks(spec).sum(dim=1).numpy() == 0)]


def knf_fbank(x: np.ndarray, spec: FbankSpec = FBANK) -> np.ndarray:
    """kaldi-native-fbank's log-mel of `x`, for any number of bins.

    With 128 bins at 16 kHz, mel bin 3 (63-93 Hz) holds no FFT bin centre (31.25 Hz spacing), and Kaldi and
    kaldi-native-fbank refuse such a filterbank ("num_mel_bins too large"); torchaudio accepts it and bin 3 is always
    log(eps). So the filterbank is asked for in pieces around the empty bins, each piece with its own low/high
    frequencies chosen so that its mel grid is exactly the matching slice of the full one, and the empty bins are
    filled with the floor.
    """
    empty = _empty_mel_bins(spec)
    if not empty:
        return _knf_one(x, spec)
    nyquist = spec.sample_rate / 2
    mel_low = _mel(spec.low_freq)
    mel_high = _mel(spec.high_freq if spec.high_freq > 0 else nyquist + spec.high_freq)
    delta = (mel_high - mel_low) / (spec.num_mel_bins + 1)
    parts, start = [], 0
    for stop in empty + [spec.num_mel_bins]:
        if stop > start:
            piece = dataclasses.replace(
                spec,
                num_mel_bins=stop - start,
                # The outermost pieces keep the spec's own edges, so rounding cannot push them past Nyquist.
                low_freq=spec.low_freq if start == 0 else _inv_mel(mel_low + start * delta),
                high_freq=spec.high_freq if stop == spec.num_mel_bins else _inv_mel(mel_low + (stop + 1) * delta),
            )
            parts.append(_knf_one(x, piece))
        if stop < spec.num_mel_bins:
            parts.append(np.full((spec.num_frames(len(x)), 1), LOG_FLOOR, dtype=np.float32))
        start = stop + 1
    return np.concatenate(parts, axis=1)


def _signals() -> dict:
    rng = np.random.default_rng(1234)
    t = np.arange(CLIP_SAMPLES) / SR
    dur = CLIP_SAMPLES / SR
    f0, f1 = 50.0, 0.99 * SR / 2
    sig = {f"tone_{f}hz": 0.5 * np.sin(2 * np.pi * f * t) for f in (100, 440, 1000, 3000, 7000)}
    sig["noise"] = 0.3 * rng.standard_normal(CLIP_SAMPLES)
    sig["linear_chirp"] = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * dur) * t**2))
    k = math.log(f1 / f0) / dur
    sig["log_chirp"] = 0.5 * np.sin(2 * np.pi * f0 * np.expm1(k * t) / k)
    sig["quiet_noise"] = 1e-4 * rng.standard_normal(CLIP_SAMPLES)  # -80 dBFS: 3.3 after the 2**15 scaling
    sig["near_floor_tone"] = 1e-6 * np.sin(2 * np.pi * 1000 * t)  # energies reach the eps floor
    sig["silence"] = np.zeros(CLIP_SAMPLES)
    for n in (400, 401, 559, 560, 12345):  # one frame, just over, one short of two, two, odd
        sig[f"noise_{n}"] = 0.3 * rng.standard_normal(n)
        sig[f"tone_{n}"] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)
    return {k: v.astype(np.float32) for k, v in sig.items()}


SIGNALS = _signals()
BROADBAND = {"noise", "quiet_noise", "silence"} | {k for k in SIGNALS if k.startswith("noise_")}


def _export(x: np.ndarray, spec: FbankSpec = FBANK) -> np.ndarray:
    out = export_fbank.kaldi_fbank(torch.from_numpy(x), spec)
    assert out.dtype == torch.float32 and out.shape[0] == 1
    return out[0].numpy()


def _check_against_knf(ours: np.ndarray, ref: np.ndarray, broadband: bool) -> None:
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)
    if broadband:
        assert err.max() <= KNF_BROADBAND_ATOL, f"max error {err.max():.2e}"
    below_peak = ref.max(axis=1, keepdims=True) - ref
    for nats, atol in KNF_BANDS:
        band = below_peak <= nats
        worst = err[band].max()
        assert worst <= atol, f"bins within {nats} nats of the frame peak: max error {worst:.2e} > {atol:.0e}"


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_export_fbank_matches_kaldi_native_fbank(name):
    x = SIGNALS[name]
    ours, ref = _export(x), knf_fbank(x)
    assert ours.shape == (FBANK.num_frames(len(x)), FBANK.num_mel_bins)
    _check_against_knf(ours, ref, name in BROADBAND)


@pytest.mark.parametrize("num_mel_bins", [23, 80])
@pytest.mark.parametrize("name", ["noise", "log_chirp", "tone_440hz"])
def test_export_fbank_matches_knf_without_splitting(name, num_mel_bins):
    # Filterbanks Kaldi accepts as they are, so no piecing together on the oracle's side.
    spec = dataclasses.replace(FBANK, num_mel_bins=num_mel_bins)
    assert _empty_mel_bins(spec) == []
    x = SIGNALS[name]
    _check_against_knf(_export(x, spec), knf_fbank(x, spec), name in BROADBAND)


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_edge_fbank_matches_export(name):
    x = SIGNALS[name]
    ours = edge_fbank.log_mel_fbank(x, FBANK)
    assert ours.dtype == np.float32
    ref = _export(x)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=EDGE_VS_EXPORT_ATOL)


def test_normalisations_agree_and_use_the_spec():
    x = SIGNALS["log_chirp"]
    raw = edge_fbank.log_mel_fbank(x, FBANK)
    norm = edge_fbank.normalize_fbank(raw, FBANK)
    assert norm.dtype == np.float32
    np.testing.assert_allclose(norm, (raw - FBANK.norm_mean) / (2 * FBANK.norm_std), rtol=0, atol=1e-6)
    ref = export_fbank.normalize_fbank(export_fbank.kaldi_fbank(torch.from_numpy(x)), FBANK)[0].numpy()
    np.testing.assert_allclose(norm, ref, rtol=0, atol=EDGE_VS_EXPORT_ATOL)
    np.testing.assert_array_equal(edge_fbank.fbank_features(x, FBANK), norm)
    other = dataclasses.replace(FBANK, norm_mean=0.0, norm_std=0.5)
    np.testing.assert_allclose(edge_fbank.normalize_fbank(raw, other), raw, rtol=0, atol=1e-6)


def test_mel_filterbanks_agree():
    edge_mel = edge_fbank.mel_filterbank(FBANK)
    export_mel = export_fbank.mel_banks(FBANK).numpy()
    assert edge_mel.shape == export_mel.shape == (FBANK.num_mel_bins, 257)
    np.testing.assert_allclose(edge_mel, export_mel, rtol=0, atol=1e-12)
    assert not edge_mel.flags.writeable


def test_bin_3_is_empty_in_beats_configuration():
    # A fact of the reference's features (torchaudio gives the same): the encoder always sees log(eps) there.
    assert _empty_mel_bins(FBANK) == [3]
    fb = edge_fbank.log_mel_fbank(SIGNALS["noise"], FBANK)
    np.testing.assert_array_equal(fb[:, 3], np.float32(LOG_FLOOR))


def test_silence_is_the_log_floor():
    fb = edge_fbank.log_mel_fbank(SIGNALS["silence"], FBANK)
    np.testing.assert_array_equal(fb, np.float32(LOG_FLOOR))


def test_frame_count_and_shapes():
    assert FBANK.num_frames(CLIP_SAMPLES) == 998
    assert edge_fbank.log_mel_fbank(np.zeros(CLIP_SAMPLES, np.float32), FBANK).shape == (998, 128)
    assert export_fbank.kaldi_fbank(torch.zeros(CLIP_SAMPLES)).shape == (1, 998, 128)
    assert export_fbank.kaldi_fbank(torch.zeros(3, CLIP_SAMPLES)).shape == (3, 998, 128)
    for n, frames in ((399, 0), (400, 1), (559, 1), (560, 2)):
        assert edge_fbank.log_mel_fbank(np.zeros(n, np.float32), FBANK).shape == (frames, 128)
        assert export_fbank.kaldi_fbank(torch.zeros(n)).shape == (1, frames, 128)


def test_batched_export_equals_one_by_one():
    xs = np.stack([SIGNALS["noise"], SIGNALS["log_chirp"]])
    batched = export_fbank.kaldi_fbank(torch.from_numpy(xs))
    for i in range(2):
        np.testing.assert_array_equal(batched[i].numpy(), _export(xs[i]))


@pytest.mark.parametrize("seconds", [3.0, 10.0, 12.0])
def test_reference_waveform_pads_and_truncates_to_998_frames(seconds):
    x = SIGNALS["noise"][: int(SR * min(seconds, 10.0))]
    if seconds > 10.0:
        x = np.concatenate([SIGNALS["noise"], SIGNALS["tone_440hz"][: int(SR * (seconds - 10.0))]])
    wav = export_fbank.reference_waveform(x, SR)
    assert wav.shape == (CLIP_SAMPLES,) and wav.dtype == torch.float32
    kept = min(len(x), CLIP_SAMPLES)
    np.testing.assert_array_equal(wav[:kept].numpy(), np.clip(x[:kept], -1, 1))
    assert torch.all(wav[kept:] == 0)
    assert export_fbank.kaldi_fbank(wav).shape == (1, 998, 128)
    assert edge_fbank.log_mel_fbank(wav.numpy(), FBANK).shape == (998, 128)


def test_reference_waveform_mono_clamp_and_order():
    rng = np.random.default_rng(7)
    left, right = rng.uniform(-1.5, 1.5, SR), rng.uniform(-1.5, 1.5, SR)
    stereo = np.stack([left, right], axis=1)
    expected = np.clip((left + right) / 2, -1, 1)
    # Channels-last and channels-first both work: the reference averages over the smaller axis.
    for audio in (stereo, stereo.T):
        wav = export_fbank.reference_waveform(audio, SR)
        np.testing.assert_allclose(wav[:SR].numpy(), expected, rtol=0, atol=1e-7)
    # Clamping comes after averaging: averaging clamped channels would differ.
    assert not np.allclose(expected, (np.clip(left, -1, 1) + np.clip(right, -1, 1)) / 2)


@pytest.mark.parametrize("rate", [8000, 22050, 32000, 44100, 48000])
def test_sinc_resample_keeps_passband_and_removes_aliases(rate):
    n = rate  # 1 s
    t = np.arange(n) / rate
    keep = np.sin(2 * np.pi * 1000 * t)
    out = export_fbank.sinc_resample(torch.from_numpy(keep), rate, SR).numpy()
    assert out.shape == (math.ceil(n * SR / rate),)
    ideal = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / SR)
    core = slice(200, -200)  # away from the zero-padded ends
    assert np.abs(out[core] - ideal[core]).max() < 1e-3
    if rate > SR:
        # 11 kHz is above the new Nyquist: it must not come back as a 5 kHz alias.
        alias = export_fbank.sinc_resample(torch.from_numpy(np.sin(2 * np.pi * 11000 * t)), rate, SR).numpy()
        assert np.sqrt(np.mean(alias[core] ** 2)) < 0.01


def test_unsupported_specs_are_refused():
    x = torch.zeros(CLIP_SAMPLES)
    for bad in (dataclasses.replace(FBANK, dither=1.0), dataclasses.replace(FBANK, snip_edges=False)):
        with pytest.raises(ValueError):
            export_fbank.kaldi_fbank(x, bad)
        with pytest.raises(ValueError):
            edge_fbank.log_mel_fbank(x.numpy(), bad)


def test_parameters_come_from_the_spec():
    # A different (valid) spec must change both implementations the same way; nothing is hard-coded.
    spec = FbankSpec(
        num_mel_bins=40,
        frame_length_ms=20.0,
        frame_shift_ms=12.5,
        preemphasis=0.9,
        window_type="hamming",
        low_freq=100.0,
        high_freq=-400.0,
        waveform_scale=1000.0,
    )
    x = SIGNALS["noise"]
    ours = edge_fbank.log_mel_fbank(x, spec)
    assert ours.shape == (spec.num_frames(len(x)), 40)
    np.testing.assert_allclose(ours, _export(x, spec), rtol=0, atol=EDGE_VS_EXPORT_ATOL)
    _check_against_knf(_export(x, spec), knf_fbank(x, spec), broadband=True)
