"""`naturelm-edge infer`: the pipeline over recordings of any length, offline.

Each file is read in blocks at its own rate, cut into windows (window/hop seconds; the last partial window padded and
processed, unless it adds under 0.5 s of audio: edge/windowing.py), and every window's events are collected. An unreadable file is reported on one line and the other files
are still processed; the exit status says whether any failed.
"""

from __future__ import annotations

import logging
import socket
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge.audio_io import AudioInfo, probe, read_blocks
from edge.errors import AudioError, ConfigError
from edge.events import WindowInfo
from edge.outputs import csv_table, jsonl, raven_table, save_embeddings
from edge.prompts import load_prompts, single_prompt
from edge.windowing import MIN_TAIL_SECONDS, Windower, window_count

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "raven", "csv")


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


def run_infer(args) -> int:
    from tqdm import tqdm

    from edge.pipeline import open_pipeline

    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE")
    prompts = single_prompt(args.prompt) if args.prompt else load_prompts(Path(args.prompts))
    if args.hop > args.window:
        raise ConfigError(f"--hop {args.hop} is longer than --window {args.window}: audio between windows is lost")
    pipeline = open_pipeline(Path(args.bundle), prompts, device_id=args.device_id, provider=args.provider,
                             precision=args.precision, quantization=args.quantization, verify="full",
                             gate_dbfs=args.gate_dbfs, n_gpu_layers=args.n_gpu_layers)
    events, embeddings, failed = [], [], []
    seq = 0
    try:
        for name in args.audio:
            path = Path(name)
            try:
                info = probe(path)
                total = window_count(info.frames, round(args.window * info.sample_rate),
                                     round(args.hop * info.sample_rate), round(MIN_TAIL_SECONDS * info.sample_rate))
                bar = tqdm(total=total, unit="win", desc=path.name, disable=args.no_progress, file=sys.stderr)
                for samples, rate, window in iter_windows(path, args.window, args.hop, info):
                    result = pipeline.process(samples, rate, window, source=str(path))
                    for e in result.events:
                        e.seq = seq
                        seq += 1
                        events.append(e)
                    if result.embedding is not None:
                        embeddings.append((str(path), window.offset_s, window.offset_s + window.duration_s,
                                           result.embedding))
                    bar.update(1)
                bar.close()
            except AudioError as e:
                logger.error("%s", e)
                failed.append(name)
    finally:
        pipeline.close()

    text = {"jsonl": jsonl, "raven": raven_table, "csv": csv_table}[args.format](events)
    if args.out:
        Path(args.out).write_text(text)
        logger.info("wrote %d events to %s", len(events), args.out)
    else:
        sys.stdout.write(text)
    if args.embeddings:
        save_embeddings(Path(args.embeddings), embeddings)
        logger.info("wrote %d window embeddings to %s", len(embeddings), args.embeddings)
    if args.plot:
        from edge.plot import plot_recording

        plot_recording(Path(args.audio[0]), [e for e in events if e.source == str(Path(args.audio[0]))],
                       Path(args.plot))
    if failed:
        print(f"naturelm-edge: {len(failed)} of {len(args.audio)} files failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


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
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files; an unreadable one is reported and skipped")
    p.add_argument("--bundle", required=True, help="model bundle directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="one question (a 'Yes or No' question becomes a yes_no prompt with a score)")
    g.add_argument("--prompts", help="YAML prompt list (id, kind, text, labels, threshold, every_n_windows)")
    p.add_argument("--window", type=float, default=10.0, help="window length in seconds (default 10, the model's)")
    p.add_argument("--hop", type=float, default=5.0, help="hop between window starts in seconds (default 5)")
    p.add_argument("--format", choices=FORMATS, default="jsonl")
    p.add_argument("--out", help="output file (default: standard output)")
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

