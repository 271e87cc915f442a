"""Facts of the NatureLM-audio reference model that both the workstation and the device side need.

This is the single place they are written. The exporter copies them into the bundle's manifest.json, and the device
reads them back from the manifest, never from here, so that a bundle made by a later exporter with other values still
runs correctly. (Source: NatureLM-audio v1.0.2, NatureLM/processors.py, models/beats/BEATs.py, models/NatureLM.py.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FbankSpec:
    """Kaldi-compatible log-mel filterbank, as torchaudio.compliance.kaldi.fbank computes it for BEATs."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    window_type: str = "povey"
    remove_dc_offset: bool = True
    dither: float = 0.0
    snip_edges: bool = True
    round_to_power_of_two: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means offset from Nyquist, as in Kaldi
    use_power: bool = True
    waveform_scale: float = 32768.0  # BEATs multiplies the [-1, 1] waveform by 2**15 before the fbank
    # BEATs normalisation: (fbank - mean) / (2 * std)
    norm_mean: float = 15.41663
    norm_std: float = 6.55582

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FbankSpec:
        return cls(**d)

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)  # Kaldi truncates

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi produces with snip_edges=True."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift


FBANK = FbankSpec()

#: The reference truncates or right-pads every clip to this many seconds.
CLIP_SECONDS = 10.0
#: Samples in one clip at the model's rate.
CLIP_SAMPLES = int(FBANK.sample_rate * CLIP_SECONDS)
#: BEATs patch size (16x16 over time x mel): 998 frames -> 62 time steps x 8 mel patches = 496 tokens.
PATCH_SIZE = 16
#: Window-level Q-Former: kernel = stride = round(1500 * 0.333333 / 30) = 17 BEATs tokens per window.
#: (The reference computes it from second_per_window / second_stride; see window_tokens().)


def window_tokens(seconds: float) -> int:
    """The reference's window size in BEATs tokens for a given `second_per_window` (NatureLM.py)."""
    return round(1500 * seconds / 30.0)


def fbank_frames(clip_samples: int = CLIP_SAMPLES) -> int:
    return FBANK.num_frames(clip_samples)


def beats_tokens(frames: int, num_mel_bins: int = FBANK.num_mel_bins, patch: int = PATCH_SIZE) -> int:
    return (frames // patch) * (num_mel_bins // patch)


def audio_embeddings_per_clip(frames: int, window: int, stride: int) -> int:
    tokens = beats_tokens(frames)
    return (tokens - window) // stride + 1


@dataclass(frozen=True)
class ResamplerSpec:
    """Upstream resamples with `resampy.resample(audio, sr, 16000)` (NatureLM/processors.py), whose default filter
    `kaiser_best` is a Kaiser-windowed sinc tabulated at 2**precision points per zero crossing and read with linear
    interpolation (edge/resample.py). Its parameters, read from resampy 0.4.3's shipped `kaiser_best.npz` (rolloff
    and table size) and fitted to its table (beta: the regenerated table equals the shipped one to 1.5e-15)."""

    kind: str = "resampy"
    filter: str = "kaiser_best"
    num_zeros: int = 50
    precision: int = 13  # bits: 8192 table points per zero crossing
    rolloff: float = 0.9173473712608761
    beta: float = 12.984585247039956

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResamplerSpec:
        return cls(**d)


@dataclass(frozen=True)
class WindowedSincSpec:
    """torchaudio.functional.resample's defaults, a Hann-windowed sinc: the filter bundles recorded before they
    recorded resampy's. Such a bundle keeps it (edge/frontend.py says once that it differs from upstream)."""

    kind: str = "windowed_sinc"
    lowpass_filter_width: int = 6
    rolloff: float = 0.99

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WindowedSincSpec:
        return cls(**d)


RESAMPLER = ResamplerSpec()
#: What a manifest without an `audio.resampler` entry means: the bundles made before it existed used this filter.
LEGACY_RESAMPLER = WindowedSincSpec()


def resampler_from_dict(d: dict | None) -> ResamplerSpec | WindowedSincSpec:
    """The resampler a manifest's `audio.resampler` names (None: a bundle from before the field, LEGACY_RESAMPLER).
    Raises ValueError naming an unknown kind or key, TypeError for what is not a mapping."""
    if d is None:
        return LEGACY_RESAMPLER
    if not isinstance(d, dict):
        raise TypeError(f"audio.resampler must be a mapping, got {type(d).__name__}")
    kinds = {"resampy": ResamplerSpec, "windowed_sinc": WindowedSincSpec}
    kind = d.get("kind")
    if kind not in kinds:
        raise ValueError(f"audio.resampler.kind {kind!r} is not one this naturelm-edge knows ({', '.join(kinds)})")
    try:
        return kinds[kind].from_dict(d)
    except TypeError as e:  # an unknown or missing key
        raise ValueError(f"audio.resampler: {e}") from None


@dataclass(frozen=True)
class PromptTemplate:
    """The exact prompt of the reference (MODEL.md). BOS is prepended as an embedding by hand; each text piece is
    tokenised on its own with no special tokens added; the audio embeddings go between `before_audio` and
    `after_audio`."""

    bos: str = "<|begin_of_text|>"
    before_audio: str = "<|start_header_id|>user<|end_header_id|>\n\n<Audio>"
    after_audio: str = "</Audio> "
    after_question: str = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    # Upstream's generate stops on Llama-3.1-Instruct's generation_config eos list (these three) and on id 2, a Llama 2
    # leftover that is the text "#" in Llama 3 and is left out here (edge/llm.py).
    stop_tokens: tuple = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_tokens"] = list(self.stop_tokens)
        return d


PROMPT = PromptTemplate()
