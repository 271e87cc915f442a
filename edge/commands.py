"""Device subcommands (torch-free)."""

from __future__ import annotations


def register(sub) -> None:
    """Adds the device-side subcommands to the CLI."""
    from edge import demo, doctor, gpu_check, infer, jetson_devices

    demo.register(sub)
    infer.register(sub)
    _register_build_engine(sub)
    _register_daemon(sub)
    doctor.register(sub)
    jetson_devices.register(sub)
    gpu_check.register(sub)


# --- build-engine (audio encoder) ---------------------------------------------------------------------------------

def cmd_build_engine(args) -> int:
    from pathlib import Path

    from edge.bundle import load_bundle
    from edge.encoder import PROVIDERS, AudioEncoder, available_providers
    from edge.errors import ProviderError

    # The bundle first (sizes and hashes of every file): a broken bundle is worth knowing about on any machine.
    bundle = load_bundle(Path(args.bundle))
    available = available_providers()
    if PROVIDERS["tensorrt"] not in available:
        raise ProviderError(
            f"TensorRT is not available: this onnxruntime build has no TensorrtExecutionProvider (it has: "
            f"{', '.join(available)}); install onnxruntime-gpu with TensorRT (on Jetson, NVIDIA's JetPack wheel). "
            "No engine was built"
        )
    encoder = AudioEncoder(bundle, precision=args.precision, provider="tensorrt", state_dir=args.state_dir,
                           max_batch=args.max_batch)
    seconds = (encoder.open_ms + encoder.warmup_ms) / 1000
    print(f"TensorRT engine for {encoder.file.name} ready in {encoder.engine_cache_dir} "
          f"({seconds:.1f} s; a cached engine loads in seconds)")
    return 0


def _register_build_engine(sub) -> None:
    p = sub.add_parser(
        "build-engine",
        help="build and cache the audio encoder's TensorRT engine (once per GPU, TensorRT version and bundle)",
        description=(
            "Build the TensorRT engine of the bundle's audio encoder and cache it under STATE_DIR, keyed by the GPU "
            "name, the TensorRT version and the ONNX file's sha256, so that the daemon starts without the "
            "minutes-long build. Meant as a systemd oneshot before the daemon. Exits non-zero, building nothing, "
            "where TensorRT is not available."
        ),
    )
    p.add_argument("--bundle", required=True, metavar="DIR", help="model bundle directory")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="engine cache root (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/naturelm-edge, else "
                        "~/.local/state/naturelm-edge)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="which ONNX graph to build from (default fp32; TensorRT runs it in fp16 either way)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="largest batch the engine's profile covers (default 1, what the daemon uses)")
    p.set_defaults(func=cmd_build_engine)


# --- run, check-config, devices (the field daemon) ----------------------------------------------------------------

def _register_daemon(sub) -> None:
    from edge.daemon_cli import register as register_daemon

    register_daemon(sub)
