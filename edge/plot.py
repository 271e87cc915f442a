"""`infer --plot`: the recording's spectrogram with each window's answers drawn over it (needs the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.audio_io import probe, read_blocks
from edge.errors import NatureLMEdgeError


def _spectrogram(audio: np.ndarray, rate: int, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    if audio.size < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.size))
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop]
    spec = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    return 10 * np.log10(spec.T + 1e-10)


def plot_recording(path: Path, events: list, out: Path, max_seconds: float = 600.0) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NatureLMEdgeError("--plot needs matplotlib: pip install 'naturelm-edge[plot]'") from None
    info = probe(path)
    blocks, have = [], 0
    for b in read_blocks(path):
        blocks.append(b)
        have += b.size
        if have >= max_seconds * info.sample_rate:
            break
    audio = np.concatenate(blocks)[: int(max_seconds * info.sample_rate)] if blocks else np.zeros(1, np.float32)
    seconds = audio.size / info.sample_rate
    spec = _spectrogram(audio, info.sample_rate)
    prompts = sorted({e.prompt_id for e in events})
    fig, (ax_ans, ax_spec) = plt.subplots(
        2, 1, figsize=(max(8.0, min(24.0, seconds / 4)), 3 + 0.45 * max(1, len(prompts))), sharex=True,
        gridspec_kw={"height_ratios": [max(1, len(prompts)), 4]})
    vmax = float(np.percentile(spec, 99.5))
    ax_spec.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=vmax - 80, vmax=vmax,
                   extent=(0, seconds, 0, info.sample_rate / 2 / 1000))
    ax_spec.set_ylabel("kHz")
    ax_spec.set_xlabel("time (s)")
    cmap = plt.get_cmap("tab10")
    for row, pid in enumerate(prompts):
        for e in (e for e in events if e.prompt_id == pid):
            start, end = e.window.offset_s, e.window.offset_s + e.window.duration_s
            if start >= seconds:
                continue
            positive = e.positive if e.positive is not None else True
            colour = cmap(row % 10) if positive else (0.85, 0.85, 0.85, 1.0)
            ax_ans.barh(row + (e.window.index % 2) * 0.45 - 0.22, end - start, left=start, height=0.4, color=colour,
                        edgecolor="black", linewidth=0.3)
            label = str(e.answer) if e.score is None else f"{e.answer} {e.score:.2f}"
            ax_ans.text(start + 0.1, row + (e.window.index % 2) * 0.45 - 0.22, label[:28], va="center",
                        fontsize=7, clip_on=True)
    ax_ans.set_yticks(range(len(prompts)), prompts)
    ax_ans.set_ylim(-0.6, max(1, len(prompts)) - 0.2)
    ax_ans.invert_yaxis()
    ax_ans.set_title(f"{path.name}: answers per window")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
