"""`naturelm-edge demo`: the whole pipeline, end to end, with nothing but the installed package.

Once, it builds a tiny random-weight bundle into a cache directory (the real build path: tiny checkpoint -> ONNX
export -> GGUF -> Q4_K_M, verified); then it synthesises bird-like audio at 44.1 kHz, runs it window by window
through the device pipeline, prints each event as it comes, and publishes the events over MQTT when a broker is given
or one answers on localhost.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge.cli_util import workstation_missing
from edge.errors import NatureLMEdgeError

logger = logging.getLogger(__name__)

DEMO_RATE = 44100  # not the model's rate, so the resampler runs as it does on a real microphone
DEMO_PROMPTS = [
    {"id": "bird", "kind": "yes_no", "text": "Is there a bird in the audio? Answer Yes or No."},
    {"id": "species", "kind": "label", "text": "What is the common name for the focal species in the audio? Answer:",
     "labels": ["American Robin", "Common Raven", "Eurasian Wren", "Barred Owl"]},
    {"id": "count", "kind": "count", "text": "How many individuals are vocalizing?"},
    {"id": "caption", "kind": "caption", "text": "Caption the audio.", "max_tokens": 16},
]
RANDOM_NOTICE = (
    "NOTE: this demo bundle has RANDOM weights (no model weights can be downloaded here); its answers are noise.\n"
    "      Everything else is real: the same export, quantization and device code a real bundle runs through.\n"
    "      For real answers build a bundle from the released weights on a workstation:\n"
    "        naturelm-edge build --naturelm NatureLM-audio/ --llama Llama-3.1-8B-Instruct/ --out bundle/\n"
    "      then: naturelm-edge infer --bundle bundle/ --prompt 'What is the common name for the focal species in "
    "the audio? Answer:' recording.wav"
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "naturelm-edge"


def ensure_demo_bundle(root: Path, progress: bool = True) -> Path:
    """The tiny bundle under `root`, built once (seconds) and reused; a half-built one is rebuilt."""
    bundle = root / "demo-bundle-tiny-v1"
    done = bundle / ".complete"
    if done.exists():
        return bundle
    if workstation_missing():
        raise NatureLMEdgeError(
            f"no demo bundle in {bundle} yet, and building one needs the workstation extra: "
            "pip install 'naturelm-edge[export]' (or pass --bundle DIR with a bundle built elsewhere)")
    import shutil

    from export.onnx_export import export_bundle
    from export.tiny_model import build_tiny_model
    from quantize.build import build_llm_bundle

    print(f"building the tiny demo bundle in {bundle} (once; a few seconds)...", file=sys.stderr)
    if bundle.exists():
        shutil.rmtree(bundle)
    with tempfile.TemporaryDirectory(prefix="naturelm-demo-") as tmp:
        naturelm_dir, llama_dir = build_tiny_model(Path(tmp) / "model", preset="tiny", seed=0)
        export_bundle(naturelm_dir, bundle, precisions=("fp32",), progress=progress)
        build_llm_bundle(naturelm_dir, llama_dir, bundle, types=("Q4_K_M",), lora_mode="merge", merging_alpha=1.0,
                         quality_clips=1, threads=1, progress=progress)
    done.write_text("ok\n")
    return bundle


def _find_broker(spec: str | None) -> tuple[str, int] | None:
    """--mqtt HOST[:PORT], or a broker answering on localhost:1883; None for neither."""
    if spec:
        host, _, port = spec.partition(":")
        try:
            return host or "localhost", int(port or 1883)
        except ValueError:
            raise NatureLMEdgeError(f"--mqtt {spec!r}: expected HOST or HOST:PORT") from None
    try:
        with socket.create_connection(("localhost", 1883), timeout=0.3):
            return "localhost", 1883
    except OSError:
        return None


def _summary(event) -> str:
    score = "" if event.score is None else f" (score {event.score:.2f})"
    return (f"[{event.window.offset_s:5.1f}-{event.window.offset_s + event.window.duration_s:5.1f} s] "
            f"{event.prompt_id:8s} {event.kind:8s} -> {event.answer!r}{score}  {event.timing_ms['total']:.0f} ms")


def run_demo(args) -> int:
    from edge.pipeline import open_pipeline
    from edge.prompts import parse_prompts
    from edge.synth import birdsong
    from edge.windowing import Windower

    print(RANDOM_NOTICE, file=sys.stderr)
    bundle = Path(args.bundle) if args.bundle else ensure_demo_bundle(Path(args.cache_dir or cache_dir()),
                                                                       progress=not args.no_progress)
    prompts = parse_prompts(DEMO_PROMPTS, "demo")
    pipeline = open_pipeline(bundle, prompts, device_id=args.device_id, provider="auto", verify="full")
    link = None
    broker = None if args.no_mqtt else _find_broker(args.mqtt)
    if broker:
        from edge.config import MqttConfig
        from edge.mqtt import MqttLink

        link = MqttLink(MqttConfig(host=broker[0], port=broker[1], prefix=args.prefix), args.device_id)
        link.start()
        if link.connected.wait(5.0):
            print(f"publishing to mqtt://{broker[0]}:{broker[1]} topic {link.events_topic} (QoS 1)")
        else:
            print(f"MQTT broker {broker[0]}:{broker[1]} did not accept the connection ({link.last_error}); "
                  "printing only", file=sys.stderr)
            link.stop()
            link = None
    else:
        print("no MQTT broker given (--mqtt HOST[:PORT]) or found on localhost:1883: printing only")

    audio = birdsong(args.seconds, DEMO_RATE, seed=args.seed)
    start = datetime.now(timezone.utc)
    windower = Windower(10.0, 5.0, DEMO_RATE)
    windows = windower.push(audio)
    tail = windower.flush()
    windows += [tail] if tail else []
    from edge.events import WindowInfo

    seq, published, mids = 0, 0, []
    t0 = time.perf_counter()
    try:
        for index, (samples, first) in enumerate(windows):
            offset = first / DEMO_RATE
            window = WindowInfo(index=index, offset_s=offset, duration_s=samples.size / DEMO_RATE,
                                start_utc=start + timedelta(seconds=offset))
            result = pipeline.process(samples, DEMO_RATE, window, source="demo:birdsong")
            for event in result.events:
                event.seq = seq
                seq += 1
                print(_summary(event))
                if args.json:
                    print("  " + event.to_json())
                if link is not None:
                    mid = link.publish_event(event.to_json())
                    if mid is not None:
                        mids.append(mid)
        if link is not None:
            deadline = time.monotonic() + 5.0
            acked, wanted = set(), set(mids)
            while time.monotonic() < deadline and not wanted <= acked:  # other mids (status) are acked here too
                try:
                    acked.add(link.acks.get(timeout=0.1))
                except queue.Empty:
                    pass
            published = len(acked & wanted)
    finally:
        pipeline.close()
        if link is not None:
            link.stop()
    elapsed = time.perf_counter() - t0
    info = pipeline.info
    print(f"\n{seq} events from {len(windows)} windows of {args.seconds:.0f} s of audio in {elapsed:.1f} s "
          f"(real-time factor {elapsed / args.seconds:.2f}); encoder on {info['encoder_provider']}, "
          f"LLM {info['quantization']}" + (f"; {published}/{len(mids)} acknowledged by the broker" if mids else ""))
    print(RANDOM_NOTICE.splitlines()[0])
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="first run: build a tiny bundle (once), run synthetic birdsong through the whole pipeline, print events",
        description=(
            "Builds a tiny random-weight bundle into the cache directory the first time (needs the export extra), "
            "synthesises bird-like audio at 44.1 kHz, runs it through the device pipeline (front end, ONNX encoder, "
            "llama.cpp) in 10 s windows with a 5 s hop, prints each event as it comes and publishes them over MQTT "
            "when a broker is given or one answers on localhost:1883. The answers are random: the weights are."
        ),
    )
    p.add_argument("--bundle", metavar="DIR", help="use this bundle instead of the tiny demo bundle")
    p.add_argument("--cache-dir", metavar="DIR", help="where the demo bundle is built (default ~/.cache/naturelm-edge)")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish events to this broker (default: localhost if one "
                   "answers)")
    p.add_argument("--no-mqtt", action="store_true", help="do not publish, even if a broker answers on localhost")
    p.add_argument("--prefix", default="naturelm", help="MQTT topic prefix (default naturelm)")
    p.add_argument("--device-id", default="demo", help="device id in events and topics (default demo)")
    p.add_argument("--seconds", type=float, default=22.0, help="seconds of synthetic audio (default 22)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic audio")
    p.add_argument("--json", action="store_true", help="also print each event's full JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while building")
    p.set_defaults(func=run_demo)
