"""Reading recordings of any length in blocks, mixed to mono at their native rate (the front end resamples each
window), so an hours-long file never has to fit in memory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from edge.errors import AudioError


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe(path: Path) -> AudioInfo:
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError, TypeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({str(e).strip().splitlines()[0]})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(f"{path}: reports {info.samplerate} Hz / {info.channels} channels")
    return AudioInfo(path=path, sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames))


def read_blocks(path: Path, block_seconds: float = 5.0) -> Iterator[np.ndarray]:
    """Mono float32 blocks at the file's own rate (channels averaged, as the reference does)."""
    info = probe(path)
    block = max(1, int(info.sample_rate * block_seconds))
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                data = f.read(block, dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                yield data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: read failed ({str(e).strip().splitlines()[0]})") from None
