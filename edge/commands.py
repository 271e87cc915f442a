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
    from edge.errors import ConfigError, ProviderError
    from edge.selfcheck import EncoderAccuracyError, check_encoder

    bundle_dir, precision, state_dir, accept = args.bundle, args.precision, args.state_dir, False
    if args.config:
        # The engine the daemon will ask for: its bundle, its precision, its state directory.
        from edge.config import load_config

        cfg = load_config(Path(args.config))
        bundle_dir = bundle_dir or str(cfg.bundle.path)
        precision = precision or cfg.bundle.encoder_precision
        state_dir = state_dir or str(cfg.state_dir)
        accept = cfg.bundle.accept_encoder_loss
    if not bundle_dir:
        raise ConfigError("build-engine: give --bundle DIR or --config FILE (which names bundle.path)")
    precision = precision or "fp32"
    if precision == "int8":
        print("bundle.encoder_precision int8 is the CPU's dynamically quantized graph: it runs on the CPU, so there "
              "is no TensorRT engine to build (use fp16 or int8-qdq on a GPU)")
        return 0
    # The bundle first (sizes and hashes of every file): a broken bundle is worth knowing about on any machine.
    bundle = load_bundle(Path(bundle_dir))
    available = available_providers()
    if PROVIDERS["tensorrt"] not in available:
        raise ProviderError(
            f"TensorRT is not available: this onnxruntime build has no TensorrtExecutionProvider (it has: "
            f"{', '.join(available)}); install onnxruntime-gpu with TensorRT (on Jetson, NVIDIA's JetPack wheel). "
            "No engine was built"
        )
    try:
        encoder = AudioEncoder(bundle, precision=precision, provider="tensorrt", state_dir=state_dir,
                               max_batch=args.max_batch)
    except ProviderError as e:
        # Inside the unit's sandbox the usual cause is a device node it does not allow: say what this process sees.
        from edge.gpu_check import probe

        raise ProviderError(f"{e}; from this process: {probe().summary()}") from None
    seconds = (encoder.open_ms + encoder.warmup_ms) / 1000
    print(f"TensorRT engine for {encoder.file.name} ready in {encoder.engine_cache_dir} "
          f"({seconds:.1f} s; a cached engine loads in seconds)")
    # The engine is what runs: check it against the bundle's reference now, and leave the result where the daemon
    # finds it (the same cache key), so that the daemon's start does not measure again.
    result = check_encoder(encoder, Path(state_dir) if state_dir else encoder.state_dir, use_cache=False)
    if result is not None:
        print(f"self-check: {result.line()}")
        if not result.passed and not accept:
            raise EncoderAccuracyError(f"{result.line()}; the daemon will refuse it unless "
                                       "bundle.accept_encoder_loss is true")
    return 0


def _register_build_engine(sub) -> None:
    p = sub.add_parser(
        "build-engine",
        help="build and cache the audio encoder's TensorRT engine (once per GPU, TensorRT version and bundle), then "
             "check it against the bundle's reference",
        description=(
            "Build the TensorRT engine of the bundle's audio encoder and cache it under STATE_DIR, keyed by the GPU "
            "name, the TensorRT version and the ONNX file's sha256, so that the daemon starts without the "
            "minutes-long build; then run the engine on the bundle's verification inputs and compare with the "
            "reference outputs (exit 2, one line naming the precision and the figure, when it is outside tolerance). "
            "With --config it builds exactly what the daemon will use: the config's bundle.path, "
            "bundle.encoder_precision and state_dir. Meant as a systemd oneshot before the daemon. Exits non-zero, "
            "building nothing, where TensorRT is not available."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="daemon configuration: take the bundle, precision and state "
                                                    "directory from it (the options below override it)")
    p.add_argument("--bundle", metavar="DIR", default=None, help="model bundle directory (default: the config's)")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="engine cache root (default: the config's state_dir, else $STATE_DIRECTORY, else "
                        "$XDG_STATE_HOME/naturelm-edge, else ~/.local/state/naturelm-edge)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8-qdq"],
                   help="which ONNX graph to build from (default: the config's bundle.encoder_precision, else "
                        "fp32). fp32 and fp16 give an fp16 engine; int8-qdq an int8 engine with fp16 for the layers "
                        "it keeps in float")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="largest batch the engine's profile covers (default 1, what the daemon uses)")
    p.set_defaults(func=cmd_build_engine)


# --- run, check-config, devices (the field daemon) ----------------------------------------------------------------

def _register_daemon(sub) -> None:
    from edge.daemon_cli import register as register_daemon

    register_daemon(sub)
