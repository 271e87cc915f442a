"""Files the daemon keeps on disk besides the outbox: FLAC clips of windows with a positive answer, and one embedding
per window. Both are bounded by total size and by age, oldest deleted first, so a recorder left alone for a season
never fills its card.

The list of kept files is read once at start-up and then kept in memory (in creation order), so enforcing the bounds
after each save costs nothing per file already on disk.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from edge.config import StoreConfig
from edge.events import WindowInfo, utc_iso

logger = logging.getLogger(__name__)


class RetainedDir:
    """A directory of files with retention by total bytes and by age."""

    def __init__(self, cfg: StoreConfig, suffix: str):
        self.dir = Path(cfg.dir)
        self.max_bytes = cfg.max_bytes
        self.max_age_s = cfg.max_age_days * 86400.0
        self.suffix = suffix
        self.dir.mkdir(parents=True, exist_ok=True)
        self.saved = 0
        self.deleted = 0
        self.failed = 0  # saves that failed (a full or failing disk), in health as {name}_failed
        self._fault: str | None = None
        files = []
        for entry in os.scandir(self.dir):
            if entry.is_file() and entry.name.endswith(suffix):
                st = entry.stat()
                files.append((st.st_mtime, entry.path, st.st_size))
        files.sort()
        self._files = deque(files)
        self.bytes = sum(f[2] for f in files)
        self.enforce()

    def save_failed(self, path: Path, e: BaseException) -> None:
        """Counted always, logged once per cause: a full card fails every save the same way."""
        self.failed += 1
        try:
            Path(path).unlink(missing_ok=True)  # a file cut short by a full disk is not a clip or an embedding
        except OSError:
            pass
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0]
        if cause != self._fault:
            logger.warning("cannot save %s: %s (further failures of this cause are counted, not logged)", path, e)
            self._fault = cause

    def added(self, path: Path) -> None:
        self._fault = None
        size = path.stat().st_size
        self._files.append((time.time(), str(path), size))
        self.bytes += size
        self.saved += 1
        self.enforce()

    def enforce(self) -> list[str]:
        cutoff = time.time() - self.max_age_s
        removed = []
        while self._files and (self.bytes > self.max_bytes or self._files[0][0] < cutoff):
            _, path, size = self._files.popleft()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("cannot delete %s for retention: %s", path, e)
            self.bytes -= size
            self.deleted += 1
            removed.append(path)
        return removed


def _stem(info: WindowInfo) -> str:
    # Sortable by time, unique per window, safe on FAT-formatted cards (no ':').
    return info.start_utc.strftime("%Y%m%dT%H%M%S") + f"{info.start_utc.microsecond // 1000:03d}Z_w{info.index:08d}"


class ClipStore(RetainedDir):
    """FLAC clips (lossless, about half the size of WAV) of the window's audio at the source's rate."""

    def __init__(self, cfg: StoreConfig):
        super().__init__(cfg, ".flac")

    def save(self, samples: np.ndarray, sample_rate: int, info: WindowInfo) -> Path | None:
        import soundfile as sf

        path = self.dir / f"{_stem(info)}.flac"
        try:
            sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
        except (OSError, RuntimeError, sf.LibsndfileError) as e:
            self.save_failed(path, e)
            return None
        self.added(path)
        return path


class EmbeddingStore(RetainedDir):
    """One `.npy` per window, and `index.jsonl` with a line per saved window (file, window start, offset, source).

    Deleted files leave stale index lines; the index is compacted when they outnumber the live ones."""

    INDEX = "index.jsonl"

    def __init__(self, cfg: StoreConfig):
        self.compact_failed = 0
        self._compact_fault: str | None = None
        super().__init__(cfg, ".npy")
        self._stale = 0
        try:
            self._compact()
        except OSError as e:  # a full card at start: record anyway, tidy later
            self.compact_failed += 1
            self._compact_fault = str(e)
            logger.warning("cannot compact %s: %s; stale lines stay until it can", self.dir / self.INDEX, e)

    def save(self, embedding: np.ndarray, info: WindowInfo, source: str) -> Path | None:
        path = self.dir / f"{_stem(info)}.npy"
        try:
            np.save(path, np.asarray(embedding, dtype=np.float32))
            line = {"file": path.name, "start": utc_iso(info.start_utc), "offset_s": round(info.offset_s, 6),
                    "duration_s": round(info.duration_s, 6), "index": info.index, "source": source,
                    "shape": list(np.shape(embedding))}
            with open(self.dir / self.INDEX, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            self.save_failed(path, e)
            return None
        self.added(path)
        return path

    def enforce(self) -> list[str]:
        removed = super().enforce()
        if removed and hasattr(self, "_stale"):
            self._stale += len(removed)
            if self._stale > max(100, len(self._files)):
                try:
                    self._compact()
                except OSError as e:
                    # Stale lines are untidy, not wrong: the embedding is saved and the window goes on; the next
                    # deletion tries again (a full card is the usual cause, and retention is what frees it).
                    self.compact_failed += 1
                    if str(e) != self._compact_fault:
                        logger.warning("cannot compact %s: %s; stale lines stay until it can", self.dir / self.INDEX,
                                       e)
                        self._compact_fault = str(e)
                else:
                    self._compact_fault = None
        return removed

    def _compact(self) -> None:
        index = self.dir / self.INDEX
        if not index.exists():
            return
        live = {Path(p).name for _, p, _ in self._files}
        kept = []
        with open(index, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("file") in live:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut short by a power loss
        tmp = index.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, index)
        self._stale = 0
