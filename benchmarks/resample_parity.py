"""Before and after: the device front end against upstream's resampy, at 32 and 48 kHz, on the `small` preset.

"Upstream" is what NatureLM-audio v1.0.2 does: `resampy.resample(x, sr, 16000)` on float64 samples, then truncate or
pad to 10 s and clamp; its features are the Kaldi fbank of that waveform (export/fbank.py) and its embeddings the
PyTorch reference audio model's (export/audio_model.py, float32) on those features. "Before" is the device front end
with the filter bundles used until now (torchaudio's windowed sinc, edge/resample.py `sinc_resample`); "after" is the
device front end with resampy's kaiser_best in numpy (the default now). Both feed the same reference model, so the
embedding differences are the front end's alone (the ONNX encoders match that model to ~1e-6, see their
verification in any bundle's manifest).

Signals (float32 samples, as a recording gives): synthetic birdsong (trills of 2-7 kHz sweeps) with a 7-9.5 kHz
harmonic, as high songbirds and insects have; white noise; a 50 Hz to Nyquist chirp; tones at 7, 7.5, 7.8, 8.5 and
9 kHz together. Per signal and rate: waveform max |difference| (full scale 1), features max and mean |difference| (in
normalised units), separately over the mel bins above 6 kHz, and embeddings max |difference| over the reference's
max |embedding|, relative RMS difference and the smallest cosine over the 29 embeddings.

    PYTHONPATH=. flock /work/.bench.lock python benchmarks/resample_parity.py [--work /tmp/naturelm-resample]

The small preset's NatureLM weights are written once into --work (a few minutes) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edge.cpu import cpu_info
from edge.fbank import mel_edges, mel_scale

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "resample_parity.json"
LLAMA_SMALL = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16}
RATES = (32000, 48000)
SECONDS = 10.0
HIGH_HZ = 6000.0


def _signals(rate: int) -> dict[str, np.ndarray]:
    from edge.synth import birdsong

    n = int(rate * SECONDS)
    t = np.arange(n) / rate
    rng = np.random.default_rng(rate)
    song = birdsong(SECONDS, rate, seed=3)[:n]
    # A harmonic above 7 kHz wherever the song is loud: where the two filters differ most.
    envelope = np.abs(song) / (np.abs(song).max() + 1e-12)
    high = 0.2 * envelope * np.sin(2 * np.pi * (7000 + 2500 * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))) * t)
    out = {
        "birdsong_with_7-9.5kHz_harmonic": song + high,
        "white_noise": 0.3 * rng.standard_normal(n),
        "chirp_50Hz_to_nyquist": 0.8 * np.sin(2 * np.pi * (50 * t + (rate / 2 - 50) * t**2 / (2 * SECONDS))),
        "tones_7_7.5_7.8_8.5_9kHz": sum(0.15 * np.sin(2 * np.pi * f * t + k) for k, f in
                                        enumerate((7000, 7500, 7800, 8500, 9000))),
    }
    return {k: np.clip(v, -1, 1).astype(np.float32) for k, v in out.items()}


def _high_bins(spec) -> int:
    """Index of the first mel bin whose left edge is above HIGH_HZ."""
    return int(np.argmax(mel_edges(spec)[:-2] >= mel_scale(HIGH_HZ)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-resample")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import resampy
    import torch

    from edge.frontend import AudioFrontEnd
    from edge.spec import CLIP_SAMPLES, CLIP_SECONDS, FBANK, LEGACY_RESAMPLER, RESAMPLER
    from export.checkpoint import load_audio_model, open_checkpoint
    from export.fbank import kaldi_fbank, normalize_fbank
    from export.tiny_model import write_naturelm_dir

    naturelm = args.work / "naturelm"
    if not (naturelm / "model.safetensors").is_file():
        print(f"writing the small preset's NatureLM weights into {naturelm} (a few minutes)", flush=True)
        write_naturelm_dir(naturelm, "small", 1, LLAMA_SMALL)
    model = load_audio_model(open_checkpoint(naturelm)).eval()
    torch.set_num_threads(2)

    def embed(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(features)).numpy()[0].astype(np.float64)

    fronts = {"before_windowed_sinc": AudioFrontEnd(FBANK, CLIP_SECONDS, sinc=LEGACY_RESAMPLER),
              "after_resampy_kaiser_best": AudioFrontEnd(FBANK, CLIP_SECONDS, sinc=RESAMPLER)}
    hb = _high_bins(FBANK)
    results = {}
    for rate in RATES:
        for name, x in _signals(rate).items():
            print(f"{rate} Hz {name}", flush=True)
            up = resampy.resample(x.astype(np.float64), rate, FBANK.sample_rate)[:CLIP_SAMPLES]
            up = np.clip(np.pad(up, (0, CLIP_SAMPLES - up.shape[0])), -1, 1).astype(np.float32)
            up_feat = normalize_fbank(kaldi_fbank(torch.from_numpy(up)), FBANK).numpy()
            up_emb = embed(up_feat)
            row = {}
            for label, fe in fronts.items():
                wav = fe.clip_waveform(x, rate)
                feat = fe.features(x, rate)
                emb = embed(feat)
                df = np.abs(feat - up_feat)[0]
                cos = (emb * up_emb).sum(-1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(up_emb, axis=-1))
                row[label] = {
                    "waveform_max_abs": float(np.abs(wav - up).max()),
                    "waveform_rms": float(np.sqrt(np.mean((wav.astype(np.float64) - up) ** 2))),
                    "features_max_abs": float(df.max()),
                    "features_mean_abs": float(df.mean()),
                    "features_above_6kHz_max_abs": float(df[:, hb:].max()),
                    "features_below_6kHz_max_abs": float(df[:, :hb].max()),
                    "embeddings_max_abs_over_scale": float(np.abs(emb - up_emb).max() / np.abs(up_emb).max()),
                    "embeddings_relative_rms": float(np.linalg.norm(emb - up_emb) / np.linalg.norm(up_emb)),
                    "embeddings_min_cosine": float(cos.min()),
                }
            results.setdefault(str(rate), {})[name] = row

    report = {
        "what": "device front end vs upstream resampy (kaiser_best) at 32 and 48 kHz: waveform, fbank features, and "
                "the small preset's embeddings (PyTorch reference audio model, float32), before (windowed sinc) "
                "and after (resampy kaiser_best in numpy)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_info(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__,
                    "torch": torch.__version__, "resampy": resampy.__version__,
                    "shared": "yes: a 2-core build VM shared with other work (figures are not timings)"},
        "mel_bins_above_6kHz": f"{hb}..{FBANK.num_mel_bins - 1}",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("waveform_max_abs", "features_max_abs", "features_above_6kHz_max_abs", "embeddings_max_abs_over_scale",
            "embeddings_min_cosine")
    print(f"\n{'rate signal':44}{'':26}" + "".join(f"{k[:18]:>20}" for k in keys))
    for rate, sigs in results.items():
        for name, row in sigs.items():
            for label, m in row.items():
                print(f"{rate + ' ' + name:44}{label:26}" + "".join(f"{m[k]:>20.3g}" for k in keys))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
