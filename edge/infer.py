"""`naturelm-edge infer`: the pipeline over recordings of any length, offline: one file, or a season of SD cards.

Each file is read in blocks at its own rate and cut into windows (window/hop seconds; the last partial window padded
and processed, unless it adds under 0.5 s of audio: edge/windowing.py). Results are written as each window completes
(edge/sinks.py), never collected: memory does not grow with the archive. With `--out-dir`, a ledger (edge/ledger.py) records every finished file, and `--resume` skips them
and cleans up after a file that was cut short. A window that fails is recorded and its file goes on; an unreadable
file is reported on one line and the others are processed; the exit status says whether anything failed.

Windows go through the model `--batch` at a time, in this process, in `--workers` local processes, or in Ray actors
(edge/workers.py); one writer, here, puts every answer where it belongs, so the outputs are the same either way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge.audio_io import AudioInfo, probe, read_blocks
from edge.errors import AudioError, ConfigError
from edge.events import WindowInfo
from edge.outputs import save_embeddings
from edge.prompts import load_prompts, single_prompt
from edge.windowing import MIN_TAIL_SECONDS, Windower, window_count
from edge.workers import FileTask

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "raven", "csv", "parquet")
OUT_DIR_DEFAULT = "jsonl,csv,raven"
#: Found in folders when no --include is given (case-insensitive): what libsndfile reads.
AUDIO_PATTERNS = ("*.wav", "*.flac", "*.ogg", "*.mp3", "*.aif", "*.aiff", "*.w64", "*.rf64")


def file_start_time(path: Path, info: AudioInfo) -> datetime:
    """Recordings carry no reliable capture clock; the file's modification time is when it was closed, so its first
    sample is that minus the duration. Good enough to order windows in wall-clock time; offsets are exact."""
    mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return mtime - timedelta(seconds=info.seconds)


def iter_windows(path: Path, window_s: float, hop_s: float, info: AudioInfo | None = None):
    """(samples, sample_rate, WindowInfo) for every window of a file, the padded tail included."""
    info = info or probe(path)
    start = file_start_time(path, info)
    windower = Windower(window_s, hop_s, info.sample_rate, name=str(path))
    index = 0

    def info_for(samples, first):
        offset = first / info.sample_rate
        return WindowInfo(index=index, offset_s=offset, duration_s=samples.size / info.sample_rate,
                          start_utc=start + timedelta(seconds=offset))

    for block in read_blocks(path):
        for samples, first in windower.push(block):
            yield samples, info.sample_rate, info_for(samples, first)
            index += 1
    tail = windower.flush()
    if tail is not None:
        yield tail[0], info.sample_rate, info_for(*tail)


@dataclass
class Recording:
    path: Path
    source: str  # as written into events: the path as given or found
    rel: str  # its name below the input folder (names its Raven table and Parquet partition)


def find_recordings(inputs: list[str], include: list[str] | None = None,
                    exclude: list[str] | None = None) -> list[Recording]:
    """Files as given, and every file below each folder (sorted) whose path relative to that folder matches an
    --include pattern (default: the audio extensions) and no --exclude pattern. Patterns are shell globs
    (`*` crosses folders: `site3/*.wav`, `*2026-06-*`); a file named on the command line is always taken."""
    include = list(include or AUDIO_PATTERNS)
    exclude = list(exclude or [])

    def matches(rel: str, patterns) -> bool:
        low = rel.lower()
        return any(fnmatch.fnmatchcase(low, pat.lower()) or fnmatch.fnmatchcase(Path(low).name, pat.lower())
                   for pat in patterns)

    found, seen = [], {}
    for name in inputs:
        root = Path(name)
        if root.is_dir():
            for p in sorted(q for q in root.rglob("*") if q.is_file()):
                rel = p.relative_to(root).as_posix()
                if matches(rel, include) and not matches(rel, exclude):
                    found.append(Recording(p, str(p), rel))
        else:
            found.append(Recording(root, name, root.name))
    for r in found:
        other = seen.setdefault(r.rel, r)
        if other is not r and other.path.resolve() != r.path.resolve():
            raise ConfigError(f"{other.source} and {r.source} would share the output name {r.rel!r}: give their "
                              "folders separately, one run each, or a common parent folder")
    unique = {}
    for r in found:
        unique.setdefault(str(r.path.resolve()), r)
    return list(unique.values())


def event_id(file_path: str, window_index: int, prompt_id: str, run_hash: str) -> str:
    """Stable across reruns and backends (the same answer of the same run has the same id), so a consumer can drop
    a duplicate and two runs compare line by line."""
    return hashlib.sha256(f"{file_path}\0{window_index}\0{prompt_id}\0{run_hash}".encode()).hexdigest()[:32]


@dataclass
class _FileState:
    rec: Recording
    fid: object = None  # ledger.FileId
    key: str = ""
    windows: int = 0
    failed: int = 0
    events: int = 0


@dataclass
class RunStats:
    files_done: int = 0
    files_failed: list = field(default_factory=list)
    files_skipped: int = 0
    files_lost: list = field(default_factory=list)
    windows: int = 0
    windows_failed: int = 0
    events: int = 0


class Writer:
    """The one writer of a run: every message from the workers lands here, in arrival order."""

    def __init__(self, args, formats: list[str], run_hash: str, ledger=None, seq0: int = 0, bar=None):
        from edge import sinks

        self.ledger = ledger
        self.run_hash = run_hash
        self.seq = seq0
        self.bar = bar
        self.stats = RunStats()
        self.files: dict[str, _FileState] = {}
        self.embeddings: list = [] if args.embeddings else None
        self.plot_events: list = [] if args.plot else None
        self.plot_source: str | None = None
        self.jsonl = self.csv = self.raven_one = self.raven = self.parquet = None
        if args.out_dir:
            out = Path(args.out_dir)
            if "jsonl" in formats:
                self.jsonl = sinks.JsonlStream(out / "events.jsonl")
            if "csv" in formats:
                self.csv = sinks.CsvStream(out / "events.csv")
            if "raven" in formats:
                self.raven = sinks.RavenPerFile(out / "raven")
            if "parquet" in formats:
                self.parquet = sinks.ParquetParts(out / "parquet")
        else:
            target = Path(args.out) if args.out else None
            if target is not None and target.exists():
                target.unlink()  # --out is this run's answer, not an archive to append to
            fmt = formats[0]
            if fmt == "jsonl":
                self.jsonl = sinks.JsonlStream(target)
            elif fmt == "csv":
                self.csv = sinks.CsvStream(target)
            else:
                self.raven_one = sinks.RavenCombined(target)

    def add_recording(self, rec: Recording) -> None:
        from edge.ledger import FileId
        from edge.sinks import file_key

        st = _FileState(rec)
        try:
            st.fid = FileId.of(rec.path, rec.source)
        except OSError:
            st.fid = FileId(str(rec.path.resolve()), rec.source, -1, -1)
        st.key = file_key(st.fid.path)
        self.files[st.fid.path] = st

    def _state(self, path: str) -> _FileState:
        return self.files[str(Path(path).resolve())]

    def handle(self, msg) -> None:
        kind = msg[0]
        if kind == "start":
            st = self._state(msg[2])
            st.windows = st.failed = st.events = 0
            if self.ledger is not None:
                self.ledger.start(st.fid, self.jsonl.tell() if self.jsonl else None,
                                  self.csv.tell() if self.csv else None)
            if self.raven:
                self.raven.begin_file(st.key)
            if self.parquet:
                self.parquet.begin_file(st.key)
        elif kind == "window":
            self._window(self._state(msg[2]), *msg[3:])
        elif kind == "end":
            self._end(self._state(msg[2]), msg[3])
        elif kind == "lost":
            st = self._state(msg[2])
            self.stats.files_lost.append(st.rec.source)
            for sink in (self.raven, self.parquet):
                if sink:
                    sink.drop(st.key)
        elif kind == "fatal":
            raise ConfigError(f"a worker could not start: {msg[2]}")

    def _window(self, st: _FileState, window: WindowInfo, events, embedding, error) -> None:
        if error is not None:
            st.failed += 1
            self.stats.windows_failed += 1
            logger.error("%s: window %d at %.1f s failed: %s", st.rec.source, window.index, window.offset_s, error)
            if self.ledger is not None:
                self.ledger.window_failed(st.fid, window.index, window.offset_s, error)
        else:
            st.windows += 1
            self.stats.windows += 1
        for e in events:
            e.seq = self.seq
            self.seq += 1
            e.event_id = event_id(st.fid.path, window.index, e.prompt_id, self.run_hash)
        st.events += len(events)
        self.stats.events += len(events)
        if events:
            if self.jsonl:
                self.jsonl.write(events)
            if self.csv:
                self.csv.write(events)
            if self.raven_one:
                self.raven_one.write(events)
            if self.raven:
                self.raven.write(st.key, events)
            if self.parquet:
                self.parquet.write(st.key, st.rec.rel, events)
        if self.embeddings is not None and embedding is not None:
            self.embeddings.append((st.rec.source, window.offset_s, window.offset_s + window.duration_s, embedding))
        if self.plot_events is not None:
            self.plot_source = self.plot_source or st.rec.source
            self.plot_events.extend(e for e in events if e.source == self.plot_source)
        if self.bar is not None:
            self.bar.update(1)

    def _end(self, st: _FileState, error: str | None) -> None:
        for s in (self.jsonl, self.csv):
            if s:
                s.sync()
        if error is None:
            if self.raven:
                self.raven.end_file(st.key, st.rec.rel)
            if self.parquet:
                self.parquet.end_file(st.key, st.rec.rel)
            if self.raven_one:
                self.raven_one.end_file()
            self.stats.files_done += 1
        else:
            logger.error("%s", error)
            self.stats.files_failed.append(st.rec.source)
            for sink in (self.raven, self.parquet):
                if sink:
                    sink.drop(st.key)
            if self.raven_one:
                self.raven_one.end_file()
        if self.ledger is not None:
            self.ledger.finish(st.fid, windows=st.windows, windows_failed=st.failed, events=st.events,
                               next_seq=self.seq, error=error)

    def close(self) -> None:
        for s in (self.jsonl, self.csv, self.raven_one):
            if s:
                s.close()


def _formats(args) -> list[str]:
    text = args.format or (OUT_DIR_DEFAULT if args.out_dir else "jsonl")
    formats = [f.strip() for f in text.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise ConfigError(f"--format {f!r}: not one of {', '.join(FORMATS)}")
    if not args.out_dir and (len(formats) != 1 or formats[0] == "parquet"):
        raise ConfigError(f"--format {text}: without --out-dir, give one of jsonl, raven, csv (several "
                          "formats, and parquet, need --out-dir)")
    return formats


def _resume_cleanup(ledger, writer: Writer, recordings: list[Recording], resume: bool, retry_failed: bool):
    """Which recordings to run, after removing the outputs of any that will run again (or never finished)."""
    from edge.sinks import file_key

    todo, skipped = [], 0
    purge: list[dict] = list(ledger.unfinished())
    for rec in recordings:
        st = writer.files[str(rec.path.resolve())]
        row = ledger.row(st.fid.path)
        if resume and ledger.is_done(st.fid, retry_failed):
            skipped += 1
            continue
        if row is not None and row["status"] != "running":
            purge.append(row)
        todo.append(rec)
    if purge:
        sources = {r["source"] for r in purge}
        for stream, col in ((writer.jsonl, "jsonl_start"), (writer.csv, "csv_start")):
            starts = [r[col] for r in purge if r[col] is not None]
            if stream is not None and starts:
                dropped = stream.purge(min(starts), sources)
                logger.info("%s: removed %d records of %d earlier or unfinished files", stream.path, dropped,
                            len(purge))
        if writer.parquet is not None:
            for r in purge:
                writer.parquet.purge(file_key(r["path"]))
        ledger.forget([r["path"] for r in purge])
    return todo, skipped


def run_infer(args) -> int:
    from tqdm import tqdm

    from edge.bundle import load_bundle
    from edge.ledger import Ledger, prompts_hash
    from edge.workers import InlineBackend, PipelineArgs, ProcessBackend, threads_per_worker

    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE")
    prompts = single_prompt(args.prompt) if args.prompt else load_prompts(Path(args.prompts))
    if args.hop > args.window:
        raise ConfigError(f"--hop {args.hop} is longer than --window {args.window}: audio between windows is lost")
    if args.out and args.out_dir:
        raise ConfigError("give --out FILE (one format) or --out-dir DIR (an archive run with a ledger), not both")
    if (args.resume or args.retry_failed) and not args.out_dir:
        raise ConfigError("--resume needs --out-dir: the ledger of finished files lives there")
    if args.batch < 1 or args.workers < 1:
        raise ConfigError(f"--batch {args.batch} / --workers {args.workers}: both must be at least 1")
    formats = _formats(args)
    if args.ray_address:
        from edge.workers import check_ray_address

        check_ray_address(args.ray_address)  # before anything is loaded: a wrong address is a one-line answer
    recordings = find_recordings(args.audio, args.include, args.exclude)
    if not recordings:
        raise ConfigError(f"no recordings found in {', '.join(args.audio)} (--include {args.include or 'audio'})")

    bundle = load_bundle(Path(args.bundle), verify="full")
    # Shared batches round differently with the batch size: a run with them is another run (exact batches give the
    # one-window answers, so --batch alone does not change the hash).
    shared = {"shared_batches": args.batch} if args.shared_batches and args.batch > 1 else {}
    run_hash = prompts_hash(prompts, window=args.window, hop=args.hop, gate_dbfs=args.gate_dbfs,
                            precision=args.precision, quantization=args.quantization, **shared)
    ledger = None
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        ledger = Ledger(Path(args.out_dir) / "ledger.sqlite", bundle.bundle_id, run_hash)
    writer = Writer(args, formats, run_hash, ledger=ledger, seq0=ledger.next_seq() if ledger else 0)
    for rec in recordings:
        writer.add_recording(rec)
    todo, skipped = (_resume_cleanup(ledger, writer, recordings, args.resume, args.retry_failed) if ledger
                     else (recordings, 0))
    writer.stats.files_skipped = skipped
    if skipped:
        logger.info("--resume: %d of %d recordings are already done under this bundle and prompt list", skipped,
                    len(recordings))

    tasks, total = [], 0
    for rec in todo:
        try:
            info = probe(rec.path)
        except AudioError as e:
            writer.handle(("start", 0, str(rec.path)))
            writer.handle(("end", 0, str(rec.path), str(e)))
            continue
        total += window_count(info.frames, round(args.window * info.sample_rate), round(args.hop * info.sample_rate),
                              round(MIN_TAIL_SECONDS * info.sample_rate))
        tasks.append(FileTask(str(rec.path), rec.source, args.window, args.hop))

    use_ray = bool(args.ray or args.ray_address)
    workers = args.workers
    threads = threads_per_worker(workers) if (workers > 1 or use_ray) else 0
    pargs = PipelineArgs(bundle=args.bundle, prompts=tuple(prompts), device_id=args.device_id,
                         provider=args.provider, precision=args.precision, quantization=args.quantization,
                         n_gpu_layers=args.n_gpu_layers, gate_dbfs=args.gate_dbfs, threads=threads,
                         verify="size", batch=args.batch, shared_batches=args.shared_batches,
                         with_embeddings=bool(args.embeddings))
    bar = tqdm(total=total, unit="win", desc="infer", disable=args.no_progress, file=sys.stderr, smoothing=0.1,
               dynamic_ncols=True)
    writer.bar = bar
    t0 = time.perf_counter()
    backend = None
    try:
        if tasks:
            if use_ray:
                from edge.workers import RayBackend

                backend = RayBackend(pargs, workers, address=args.ray_address, cpus_per_worker=max(1, threads))
            elif workers > 1:
                backend = ProcessBackend(pargs, workers)
            else:
                backend = InlineBackend(pargs)
            for msg in backend.run(tasks):
                writer.handle(msg)
    finally:
        bar.close()
        if backend is not None:
            backend.close()
        writer.close()
        if ledger is not None:
            ledger.close()
    elapsed = time.perf_counter() - t0

    st = writer.stats
    if args.embeddings:
        save_embeddings(Path(args.embeddings), writer.embeddings)
        logger.info("wrote %d window embeddings to %s", len(writer.embeddings), args.embeddings)
    if args.plot and writer.plot_source:
        from edge.plot import plot_recording

        plot_recording(Path(writer.plot_source), writer.plot_events, Path(args.plot))
    where = args.out_dir or args.out or "standard output"
    logger.info("%d files done, %d skipped as done, %d failed; %d windows (%d failed), %d events in %.1f s "
                "(%.2f windows/s) -> %s", st.files_done, st.files_skipped, len(st.files_failed), st.windows,
                st.windows_failed, st.events, elapsed, st.windows / elapsed if elapsed > 0 else 0.0, where)
    problems = []
    if st.files_failed:
        problems.append(f"{len(st.files_failed)} of {len(recordings)} files failed: {', '.join(st.files_failed)}")
    if st.windows_failed:
        problems.append(f"{st.windows_failed} windows failed (logged above"
                        + ("; in the ledger's window_errors table; --resume --retry-failed runs their files again)"
                           if ledger else ")"))
    if st.files_lost:
        problems.append(f"{len(st.files_lost)} files were cut short by a lost worker ({', '.join(st.files_lost)}): "
                        + ("rerun with --resume" if ledger else "run them again"))
    for p in problems:
        print(f"naturelm-edge: {p}", file=sys.stderr)
    return 1 if problems else 0


def register(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="run a bundle over recordings (any length, WAV/FLAC/OGG/MP3) and write the answers",
        description=(
            "Cut each recording into windows (the last partial window is padded, not dropped, unless it adds less "
            f"than {MIN_TAIL_SECONDS:g} s of audio, which is logged), ask every prompt of "
            "every window, and write one result per prompt per window. jsonl: the event schema; raven: a Raven "
            "selection table (consecutive windows with the same answer merged; yes_no prompts list only positive "
            "windows); csv: one row per answer."
        ),
    )
    p.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="audio files and folders (searched recursively); an unreadable file is reported and skipped")
    p.add_argument("--bundle", required=True, help="model bundle directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="one question (a 'Yes or No' question becomes a yes_no prompt with a score)")
    g.add_argument("--prompts", help="YAML prompt list (id, kind, text, labels, threshold, every_n_windows)")
    p.add_argument("--window", type=float, default=10.0, help="window length in seconds (default 10, the model's)")
    p.add_argument("--hop", type=float, default=5.0, help="hop between window starts in seconds (default 5)")
    p.add_argument("--format", metavar="FMT[,FMT]",
                   help=f"with --out: one of jsonl (default), raven, csv; with --out-dir: any of {', '.join(FORMATS)} "
                        f"(default {OUT_DIR_DEFAULT}; parquet needs the `archive` extra)")
    p.add_argument("--out", help="output file (default: standard output)")
    p.add_argument("--out-dir", metavar="DIR",
                   help="an archive run: events.jsonl and events.csv appended as windows complete, "
                        "raven/<file>.selections.txt per recording, parquet/source=<file>/date=<day>/ parts, and "
                        "ledger.sqlite, the record of finished files that --resume reads")
    p.add_argument("--resume", action="store_true",
                   help="skip recordings the ledger has as done with the same size, modification time, bundle and "
                        "prompt list (anything else runs again; lines of files cut short are removed first)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: also run again the files that had failed windows")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="in folders, take files whose relative path or name matches (repeatable; default: "
                        + " ".join(AUDIO_PATTERNS) + ")")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="in folders, leave out matches (repeatable)")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="windows taken together: the LLM holds B windows in one context (its KV cache). Each "
                        "window still goes through the audio encoder and llama.cpp in calls of its own, so the "
                        "answers are bit for bit those of B=1, and no faster: see --shared-batches (README: A season "
                        "of recordings)")
    p.add_argument("--shared-batches", action="store_true",
                   help="with --batch: the B windows share llama.cpp calls, which decodes long answers (captions) "
                        "faster; scores then move in the last digits and a near-tie between two tokens can flip, so "
                        "generated text may differ from --batch 1")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N worker processes on this machine (or N Ray actors with --ray), each with its own model "
                        "and cores//N threads; outputs identical to one process")
    p.add_argument("--ray", action="store_true", help="run the workers as Ray actors (the `ray` extra): locally, "
                                                      "or on the cluster of --ray-address")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster: host:port of its head (`ray start --head` prints it; run infer "
                        "on a node of the cluster), auto (the cluster started on this machine), or ray://host:10001 "
                        "(Ray Client: pip install 'ray[client]'). A token-authenticated cluster (Ray's default) needs "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. A lost Ray worker is replaced; its file is left "
                        "unfinished for --resume")
    p.add_argument("--embeddings", metavar="PATH.npz", help="save one pooled embedding per window with its time span")
    p.add_argument("--plot", metavar="PATH.png", help="draw the first recording's spectrogram with the answers")
    p.add_argument("--provider", default="auto", choices=["auto", "tensorrt", "cuda", "cpu"],
                   help="audio encoder provider (default auto: TensorRT > CUDA > CPU)")
    p.add_argument("--precision", default="fp32", help="audio encoder precision in the bundle (fp32, fp16, int8)")
    p.add_argument("--quantization", help="which LLM of the bundle (default: the manifest's default)")
    p.add_argument("--n-gpu-layers", type=int, default=None, help="LLM layers to offload (default: all if possible)")
    p.add_argument("--gate-dbfs", type=float, default=None,
                   help="skip windows quieter than this RMS level in dBFS (default: off)")
    p.add_argument("--device-id", default=socket.gethostname(), help="device id written into events")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_infer)

