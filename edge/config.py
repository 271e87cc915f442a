"""The field daemon's configuration: one YAML file, validated at load into frozen dataclasses.

Every problem is one line that names the file and the key path
(`daemon.yaml: mqtt.port: must be an integer 1..65535, got 'abc'`), raised before anything starts: a recorder that
is left alone for months should refuse a bad file at install time, not fail at 3 a.m. on the first reconnect. All
problems of a file are collected and raised together (ConfigErrors, one line each), structural ones included when a
path in the file does not exist on the machine that checks it.

Relative paths in the file are relative to the file's own directory, so a config and its prompts file can move
together. Secrets (the MQTT password) are never stored in these objects: the config names where the password lives
(`password_file`, or `password_credential` under systemd's $CREDENTIALS_DIRECTORY) and `read_mqtt_password` reads it
into a Secret whose repr is redacted, so no log line or traceback can show it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from edge.errors import ConfigError, show_value
from edge.prompts import key_text, load_prompts

__all__ = [
    "BirdnetConfig", "BundleConfig", "Config", "DetectionsConfig", "EndpointConfig", "FileConfig", "HealthConfig",
    "LoadConfig", "MicConfig", "MqttConfig", "NotifyConfig", "OutboxConfig", "PrivacyConfig", "RemoteControlConfig",
    "SchedulingConfig", "Secret", "SiteConfig", "SourceConfig", "StdinConfig", "StoreConfig", "ThermalConfig",
    "TlsConfig", "WatchdogConfig", "WindowingConfig", "load_config", "read_mqtt_password", "restart_needed",
]

PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")
PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
VERIFY = ("full", "size", "none")
SOURCE_TYPES = ("mic", "file", "stdin")
SAMPLE_FORMATS = ("s16le", "s32le", "f32le")
DEFAULT_STATE_DIR = "/var/lib/naturelm-edge"
#: Linux thermal zones (on a Jetson: cpu, gpu, soc and tj, the junction maximum), in millidegrees Celsius.
DEFAULT_THERMAL_ZONES = ("/sys/class/thermal/thermal_zone*/temp",)
# device_id and prefix end up in MQTT topic names: no wildcards, no separators, nothing a shell or HA would mangle.
_TOPIC_WORD = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64})*$")
_REQUIRED = object()
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kKMGT])(i?)B|B?)\s*$")


class Secret:
    """A secret string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True)
class BundleConfig:
    path: Path
    encoder_precision: str = "fp32"
    provider: str = "auto"
    quantization: str | None = None  # None: the bundle's default LLM file
    n_gpu_layers: int | None = None  # None: the engine's default (all layers where a GPU is present)
    verify: str = "full"
    llm_threads: int | None = None  # llama.cpp CPU threads; None: every core this process may use
    encoder_threads: int = 0  # onnxruntime intra-op threads; 0: one per physical core
    # A GPU board: the model on the CPU there is `degraded` (gpu_fallback). None (auto): a Jetson, or a config that
    # asks for a GPU provider or offloaded LLM layers (edge/gpu_check.py).
    expect_gpu: bool | None = None
    # The encoder checks itself against the bundle's reference at start (edge/selfcheck.py); out of tolerance, the
    # daemon refuses to run on it unless this is true, and then reports `encoder_accuracy` as degraded.
    accept_encoder_loss: bool = False


@dataclass(frozen=True)
class MicConfig:
    device: str | int | None = None  # name substring (case-insensitive) or PortAudio index; None: the default input
    samplerate: int | None = None  # None: the device's native rate (the front end resamples each window)
    channels: int = 1
    block_s: float = 0.1


@dataclass(frozen=True)
class FileConfig:
    path: Path
    realtime: bool = True
    loop: bool = False


@dataclass(frozen=True)
class StdinConfig:
    samplerate: int
    channels: int = 1
    format: str = "s16le"


@dataclass(frozen=True)
class SourceConfig:
    type: str
    mic: MicConfig | None = None
    file: FileConfig | None = None
    stdin: StdinConfig | None = None
    stall_timeout_s: float = 5.0
    reconnect_min_delay_s: float = 1.0
    reconnect_max_delay_s: float = 60.0
    ring_s: float = 30.0

    @property
    def name(self) -> str:
        """What events carry in `source`."""
        if self.type == "file":
            return str(self.file.path)
        if self.type == "stdin":
            return "stdin"
        return "mic" if self.mic.device is None else f"mic:{self.mic.device}"


@dataclass(frozen=True)
class WindowingConfig:
    window_s: float = 10.0
    hop_s: float = 5.0
    gate_dbfs: float | None = None  # windows quieter than this (RMS dBFS) skip the model; None: no gate
    max_pending: int = 4
    batch_max: int = 1  # behind real time, up to this many waiting windows go through the model at once
    shared_batches: bool = False  # those windows share llama.cpp calls: faster, answers within rounding (edge/llm.py)


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False  # skip host name verification (self-signed lab brokers only)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    prefix: str = "naturelm"
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_credential: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = 60
    reconnect_min_delay_s: float = 1.0
    reconnect_max_delay_s: float = 120.0
    homeassistant_discovery: bool = False
    discovery_prefix: str = "homeassistant"
    max_inflight: int = 20


@dataclass(frozen=True)
class OutboxConfig:
    path: Path
    max_bytes: int = 64 * 1024 * 1024
    max_events: int = 200_000
    # At start, how long a write lock held by another process is waited out before the daemon exits (status 75).
    lock_timeout_s: float = 60.0


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 60.0


@dataclass(frozen=True)
class StoreConfig:
    """Clips or embeddings on disk, with retention by total size and by age."""

    enabled: bool
    dir: Path
    max_bytes: int = 1024 * 1024 * 1024
    max_age_days: float = 30.0


@dataclass(frozen=True)
class WatchdogConfig:
    enabled: bool = True


@dataclass(frozen=True)
class ThermalConfig:
    """Shed low-priority prompts while the hottest zone is at or above `shed_above_c`; resume below `resume_below_c`."""

    enabled: bool = True
    zones: tuple = DEFAULT_THERMAL_ZONES  # globs of files holding millidegrees Celsius (or of zone directories)
    shed_above_c: float = 85.0
    resume_below_c: float = 75.0
    interval_s: float = 5.0  # how often the zones are read


@dataclass(frozen=True)
class LoadConfig:
    """Shed while inference falls behind real time: `shed_pending` windows waiting, or a recent real-time factor of
    `shed_rtf`; resume when both are back at or under their resume values. Only for paced sources (a microphone, a file
    in real time): an unpaced source waits for the model and cannot fall behind."""

    enabled: bool = True
    shed_rtf: float = 1.0
    resume_rtf: float = 0.7
    shed_pending: int = 3
    resume_pending: int = 0


@dataclass(frozen=True)
class SchedulingConfig:
    thermal: ThermalConfig = field(default_factory=ThermalConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    shed_step_s: float = 10.0  # at least this long between two steps of shedding (one priority level each)
    resume_step_s: float = 60.0  # at least this long after any step before one level is resumed


@dataclass(frozen=True)
class PrivacyConfig:
    """A yes_no prompt (e.g. "Is there human speech?") whose positive answer keeps the window's clip and embedding off
    the disk and, with withhold_events, the window's other events off the network."""

    prompt_id: str | None = None
    withhold_events: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """Where the recorder stands; events carry it, the BirdNET-Go-compatible payload needs it."""

    latitude: float | None = None
    longitude: float | None = None


@dataclass(frozen=True)
class NotifyConfig:
    """When a detection start is worth a notification (the BirdNET-Go-compatible topic)."""

    cooldown_s: float = 0.0  # no new notification for the same prompt and label within this many seconds
    first_of_day: bool = False  # only the first detection of the local day, per prompt and label


@dataclass(frozen=True)
class BirdnetConfig:
    enabled: bool = False
    topic: str | None = None  # None: {prefix}/{device_id}/birdnet
    prompts: tuple = ()  # label prompt ids; empty: every label prompt


@dataclass(frozen=True)
class DetectionsConfig:
    quiet_s: float = 30.0  # a detection ends after this many audio seconds without a positive answer
    max_live_age_s: float = 300.0  # events older than this at publish time are marked late and trigger nothing live
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    notify_prompts: tuple = ()  # ((prompt_id, NotifyConfig), ...) overrides
    birdnet: BirdnetConfig = field(default_factory=BirdnetConfig)

    def notify_for(self, prompt_id: str) -> NotifyConfig:
        return dict(self.notify_prompts).get(prompt_id, self.notify)


REMOTE_ACTIONS = ("health", "enable_prompt", "disable_prompt", "set_threshold")


@dataclass(frozen=True)
class RemoteControlConfig:
    """Commands on {prefix}/{device_id}/set; only `allow`ed actions, only on `prompts`."""

    enabled: bool = False
    allow: tuple = ()
    prompts: tuple = ()
    threshold_min: float = 0.05
    threshold_max: float = 0.99


@dataclass(frozen=True)
class EndpointConfig:
    """A listening HTTP endpoint (clip server, metrics): off unless enabled, on the loopback unless bound wider."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None  # clip server: the base URL events carry (None: http://{bind}:{port})


@dataclass(frozen=True)
class Config:
    path: Path
    device_id: str
    bundle: BundleConfig
    source: SourceConfig
    windowing: WindowingConfig
    prompts: tuple  # of PromptSpec
    mqtt: MqttConfig
    outbox: OutboxConfig
    health: HealthConfig
    clips: StoreConfig
    embeddings: StoreConfig
    state_dir: Path
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    detections: DetectionsConfig = field(default_factory=DetectionsConfig)
    remote_control: RemoteControlConfig = field(default_factory=RemoteControlConfig)
    clip_server: EndpointConfig = field(default_factory=lambda: EndpointConfig(port=8089))
    metrics: EndpointConfig = field(default_factory=lambda: EndpointConfig(port=9108))

    def summary(self) -> str:
        """One paragraph for `check-config` and the start-up log; never a secret."""
        m = self.mqtt
        auth = "no auth"
        if m.username:
            where = f"file {m.password_file}" if m.password_file else (
                f"credential {m.password_credential!r}" if m.password_credential else "no password")
            auth = f"user {m.username!r}, password from {where}"
        return (
            f"device {self.device_id}; bundle {self.bundle.path} ({self.bundle.encoder_precision}, provider "
            f"{self.bundle.provider}); source {self.source.type} {self.source.name}; windows {self.windowing.window_s:g} s "
            f"every {self.windowing.hop_s:g} s; {len(self.prompts)} prompt(s): "
            f"{', '.join(p.id for p in self.prompts)}; mqtt {'tls' if m.tls else 'tcp'}://{m.host}:{m.port} "
            f"prefix {m.prefix!r} ({auth}); outbox {self.outbox.path}; state {self.state_dir}; clips "
            f"{'on' if self.clips.enabled else 'off'}; embeddings {'on' if self.embeddings.enabled else 'off'}"
            + (f"; privacy prompt {self.privacy.prompt_id}" + (" (withholds events)" if self.privacy.withhold_events
                                                                else "") if self.privacy.prompt_id else "")
        )


# --- reading ------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; in a config that hides an edit, so it is an error."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # `? [a, b]`: YAML allows a list as a key, a Python dict does not
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} cannot be a key (line {key_node.start_mark.line + 1})",
                key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _finite(v) -> bool:
    """math.isfinite that takes any int (YAML gives Python ints of any size; float() of a huge one overflows)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


#: load_config collects every problem here (one ConfigError each) instead of stopping at the first; per thread, so
#: a SIGHUP reload and a test never share a list.
_collector = threading.local()
#: raw() of a required key that is missing: reported already, so the typed getters say nothing more about it.
_MISSING = object()


def _report(err: ConfigError) -> None:
    errors = getattr(_collector, "errors", None)
    if errors is None:
        raise err
    errors.append(err)


class ConfigErrors(ConfigError):
    """Every problem of one config file, one line each (`check-config` and the daemon print them all)."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class _Section:
    """A mapping being read, that knows its key path and reports unknown keys when done.

    A problem is reported (and reading goes on with the default, or None) rather than raised, so that a file with
    several mistakes gets them all at once: `fail`. A section that is itself missing or not a mapping is reported
    once, and then read as empty and `quiet` (its own keys would only repeat that)."""

    def __init__(self, origin: str, data, path: str, base_dir: Path, quiet: bool = False):
        self.origin, self.path, self.base_dir, self.quiet = origin, path, base_dir, quiet
        self.bad: set = set()  # keys reported as wrong: cross-checks involving them would only add noise
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(None, f"must be a mapping, got {show_value(data)}")
            data, self.quiet = {}, True
        self.data = data
        self.used: set = set()
        self._typos: set = set()

    def key(self, name) -> str:
        name = key_text(name)
        return f"{self.path}.{name}" if self.path else name

    def error(self, name, message: str) -> ConfigError:
        where = self.key(name) if name is not None else (self.path or "top level")
        return ConfigError(f"{self.origin}: {where}: {message}")

    def fail(self, name, message: str) -> None:
        """Report a problem at `name` (None: the section itself); raises only outside load_config's collection."""
        self.bad.add(name)
        if not self.quiet:
            _report(self.error(name, message))

    def ok(self, *names) -> bool:
        """None of `names` was reported wrong (so a check across them is meaningful)."""
        return not self.bad.intersection(names)

    def _bad(self, name, message: str, default):
        self.fail(name, message)
        return None if default is _REQUIRED else default

    def _missing(self, name: str, what: str) -> str:
        # A required key is often missing because it is misspelt: say so, rather than only "missing".
        typo = difflib.get_close_matches(name, [str(k) for k in self.data if k not in self.used], n=1)
        self._typos.update(typo)  # done() does not report it again as an unknown key
        return f"missing ({what})" + (f"; is {typo[0]!r} a misspelling of it?" if typo else "")

    def raw(self, name: str, default=_REQUIRED):
        self.used.add(name)
        if name not in self.data or (self.data[name] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                self.fail(name, self._missing(name, "required"))
                return _MISSING
            return default
        return self.data[name]

    def sub(self, name: str, required: bool = False) -> _Section | None:
        """The section under `name`; None when it is absent and optional (a required one that is absent is reported
        and read as an empty, quiet section)."""
        if name not in self.data or self.data[name] is None:
            self.used.add(name)
            if required:
                self.fail(name, self._missing(name, "required section"))
                return _Section(self.origin, {}, self.key(name), self.base_dir, quiet=True)
            return None
        return _Section(self.origin, self.raw(name), self.key(name), self.base_dir, quiet=self.quiet)

    def string(self, name: str, default=_REQUIRED, pattern: re.Pattern | None = None, hint: str = ""):
        v = self.raw(name, default)
        if v is _MISSING:
            return None
        if v is default and default is not _REQUIRED:
            return v
        if not isinstance(v, str) or not v.strip():
            return self._bad(name, f"must be a non-empty string, got {show_value(v)}", default)
        if pattern is not None and not pattern.match(v):
            return self._bad(name, f"{hint}, got {show_value(v)}", default)
        return v

    def choice(self, name: str, options: tuple, default=_REQUIRED):
        v = self.raw(name, default)
        if v is _MISSING:
            return None
        if v not in options:
            return self._bad(name, f"must be one of {', '.join(options)}, got {show_value(v)}", default)
        return v

    def boolean(self, name: str, default=_REQUIRED) -> bool:
        v = self.raw(name, default)
        if v is _MISSING:
            return None
        if not isinstance(v, bool):
            return self._bad(name, f"must be true or false, got {show_value(v)}", default)
        return v

    def integer(self, name: str, lo: int, hi: int | None = None, default=_REQUIRED):
        v = self.raw(name, default)
        if v is _MISSING or (v is default and default is None):
            return None
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            return self._bad(name, f"must be an integer {rng}, got {show_value(v)}", default)
        return v

    def number(self, name: str, lo: float, hi: float | None = None, default=_REQUIRED, lo_open: bool = False):
        v = self.raw(name, default)
        if v is _MISSING or (v is default and default is None):
            return None
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        rng = low if hi is None else (f"{low} and <= {hi:g}" if lo_open else f"{lo:g}..{hi:g}")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            bad = self._bad(name, f"must be a number {rng}, got {show_value(v)}", default)
            return None if bad is None else float(bad)
        return float(v)

    def size(self, name: str, default=_REQUIRED) -> int:
        """Bytes: an integer, or a number with a unit: KiB/MiB/GiB/TiB (1024-based), kB/MB/GB/TB (1000-based)."""
        v = self.raw(name, default)
        if v is _MISSING:
            return None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        m = _SIZE.match(v) if isinstance(v, str) else None
        if m:
            unit = (m.group(2) or "").upper()
            power = "KMGT".index(unit) + 1 if unit else 0
            value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** power
            if 1 <= value < 2 ** 63:  # float() of 400 digits is inf, and int(inf) raises
                return int(value)
        return self._bad(name, f"must be a positive size in bytes (e.g. 67108864, '64MiB' or '2GB'), got "
                               f"{show_value(v)}", default)

    def path_value(self, name: str, default=_REQUIRED, must_exist: str | None = None) -> Path | None:
        v = self.raw(name, default)
        if v is _MISSING or (v is default and default is None):
            return None
        if isinstance(v, Path):
            p = v
        elif isinstance(v, str) and v.strip():
            p = Path(os.path.expanduser(v.strip()))
        else:
            return self._bad(name, f"must be a path, got {show_value(v)}", default)
        if not p.is_absolute():
            p = self.base_dir / p
        # A path missing on this machine is one problem among others: the rest of the file is still checked.
        if must_exist == "file" and not p.is_file():
            self.fail(name, f"file not found: {p}")
        if must_exist == "dir" and not p.is_dir():
            self.fail(name, f"directory not found: {p}")
        return p

    def done(self) -> None:
        known = sorted(str(k) for k in self.used)
        for k in self.data:
            if k in self.used or str(k) in self._typos:
                continue
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known here: {', '.join(known)}"
            self.fail(k, f"unknown key ({hint})")


def _bundle(s: _Section) -> BundleConfig:
    b = BundleConfig(
        path=s.path_value("path", must_exist="dir"),
        encoder_precision=s.choice("encoder_precision", PRECISIONS, "fp32"),
        provider=s.choice("provider", PROVIDERS, "auto"),
        quantization=s.string("quantization", None),
        n_gpu_layers=s.integer("n_gpu_layers", -1, 10000, None),
        verify=s.choice("verify", VERIFY, "full"),
        llm_threads=s.integer("llm_threads", 1, 1024, None),
        encoder_threads=s.integer("encoder_threads", 0, 1024, 0),
        expect_gpu=_expect_gpu(s),
        accept_encoder_loss=s.boolean("accept_encoder_loss", False),
    )
    s.done()
    return b


def _expect_gpu(s: _Section) -> bool | None:
    v = s.raw("expect_gpu", "auto")
    if v == "auto":
        return None
    if isinstance(v, bool):
        return v
    s.fail("expect_gpu", f"must be auto, true or false, got {show_value(v)}")
    return None


def _mic(sub: _Section) -> MicConfig:
    dev = sub.raw("device", None)
    bad = isinstance(dev, bool) or not isinstance(dev, (str, int, type(None)))
    if bad or (isinstance(dev, str) and not dev.strip()) or (isinstance(dev, int) and dev < 0):
        sub.fail("device", f"must be a device name (substring) or an index >= 0, got {show_value(dev)}")
        dev = None
    return MicConfig(device=dev, samplerate=sub.integer("samplerate", 1000, 768000, None),
                     channels=sub.integer("channels", 1, 64, 1), block_s=sub.number("block_s", 0.005, 1.0, 0.1))


def _source(s: _Section) -> SourceConfig:
    kind = s.choice("type", SOURCE_TYPES)
    parsed = {}
    for name in SOURCE_TYPES:
        # The microphone needs no settings (default device, native rate); file and stdin do.
        sub = s.sub(name, required=(name == kind and name != "mic"))
        if sub is None:
            if name == kind:
                sub = _Section(s.origin, {}, s.key(name), s.base_dir)
            else:
                continue
        if name == "mic":
            parsed[name] = _mic(sub)
        elif name == "file":
            # An absent file is an error only when the file source is the one in use.
            parsed[name] = FileConfig(path=sub.path_value("path", must_exist="file" if kind == "file" else None),
                                      realtime=sub.boolean("realtime", True), loop=sub.boolean("loop", False))
        else:
            parsed[name] = StdinConfig(samplerate=sub.integer("samplerate", 1000, 768000),
                                       channels=sub.integer("channels", 1, 64, 1),
                                       format=sub.choice("format", SAMPLE_FORMATS, "s16le"))
        sub.done()
    lo = s.number("reconnect_min_delay_s", 0.05, 3600, 1.0)
    hi = s.number("reconnect_max_delay_s", 0.05, 86400, 60.0)
    if s.ok("reconnect_min_delay_s", "reconnect_max_delay_s") and hi < lo:
        s.fail("reconnect_max_delay_s", f"must be >= reconnect_min_delay_s ({lo:g}), got {hi:g}")
    cfg = SourceConfig(type=kind, mic=parsed.get("mic"), file=parsed.get("file"), stdin=parsed.get("stdin"),
                       stall_timeout_s=s.number("stall_timeout_s", 0.2, 3600, 5.0),
                       reconnect_min_delay_s=lo, reconnect_max_delay_s=hi, ring_s=s.number("ring_s", 1.0, 3600, 30.0))
    s.done()
    return cfg


def _windowing(s: _Section | None, origin: str, base_dir: Path) -> WindowingConfig:
    s = s or _Section(origin, {}, "windowing", base_dir)
    window = s.number("window_s", 0.0, 600, 10.0, lo_open=True)
    hop = s.number("hop_s", 0.0, 600, 5.0, lo_open=True)
    if s.ok("hop_s", "window_s") and hop > window:
        s.fail("hop_s", f"must be <= window_s ({window:g}); a longer hop leaves audio unheard, got {hop:g}")
    cfg = WindowingConfig(window_s=window, hop_s=hop, gate_dbfs=s.number("gate_dbfs", -200.0, 0.0, None),
                          max_pending=s.integer("max_pending", 1, 1000, 4),
                          batch_max=s.integer("batch_max", 1, 64, 1),
                          shared_batches=s.boolean("shared_batches", False))
    s.done()
    return cfg


def _mqtt(s: _Section) -> MqttConfig:
    tls = None
    t = s.sub("tls")
    if t is not None:
        tls = TlsConfig(ca=t.path_value("ca", None, must_exist="file"),
                        cert=t.path_value("cert", None, must_exist="file"),
                        key=t.path_value("key", None, must_exist="file"),
                        insecure=t.boolean("insecure", False))
        if tls.key is not None and tls.cert is None:
            t.fail("key", "a client key needs its certificate (cert)")
        t.done()
    username = s.string("username", None)
    pw_file = s.path_value("password_file", None, must_exist="file")
    credential = s.string("password_credential", None, re.compile(r"^[A-Za-z0-9_.-]{1,255}$"),
                          "must be a systemd credential name (letters, digits, '_', '.', '-')")
    if pw_file is not None and credential is not None:
        s.fail("password_credential", "give password_file or password_credential, not both")
    if (pw_file is not None or credential is not None) and username is None:
        s.fail("username", "missing: a password needs a user name")
    lo = s.number("reconnect_min_delay_s", 0.05, 3600, 1.0)
    hi = s.number("reconnect_max_delay_s", 0.05, 86400, 120.0)
    if s.ok("reconnect_min_delay_s", "reconnect_max_delay_s") and hi < lo:
        s.fail("reconnect_max_delay_s", f"must be >= reconnect_min_delay_s ({lo:g}), got {hi:g}")
    cfg = MqttConfig(
        host=s.string("host", "localhost"),
        port=s.integer("port", 1, 65535, 8883 if tls else 1883),
        prefix=s.string("prefix", "naturelm", _PREFIX, "must be topic levels of letters, digits, '_', '.', '-' "
                        "joined by '/', no wildcards"),
        client_id=s.string("client_id", None),
        username=username, password_file=pw_file, password_credential=credential, tls=tls,
        keepalive_s=s.integer("keepalive_s", 5, 65535, 60),
        reconnect_min_delay_s=lo, reconnect_max_delay_s=hi,
        homeassistant_discovery=s.boolean("homeassistant_discovery", False),
        discovery_prefix=s.string("discovery_prefix", "homeassistant", _PREFIX, "must be a topic prefix"),
        max_inflight=s.integer("max_inflight", 1, 1000, 20),
    )
    s.done()
    return cfg


def _store(s: _Section | None, name: str, origin: str, base_dir: Path, state_dir: Path) -> StoreConfig:
    s = s or _Section(origin, {}, name, base_dir)
    cfg = StoreConfig(
        enabled=s.boolean("enabled", False),
        dir=s.path_value("dir", state_dir / name),
        max_bytes=s.size("max_bytes", 1024 * 1024 * 1024),
        max_age_days=s.number("max_age_days", 0.0, 36500, 30.0, lo_open=True),
    )
    s.done()
    return cfg


def load_config(path, env=None) -> Config:
    """Read and validate a daemon config. Raises ConfigError naming the file and the key path."""
    env = os.environ if env is None else env
    path = Path(path)
    origin = str(path)
    if not path.is_file():
        raise ConfigError(f"{origin}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{origin}: cannot read ({e})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[-1]
        raise ConfigError(f"{origin}: not valid YAML: {where}{problem}") from None
    except ValueError as e:  # PyYAML's int() of a number with more digits than Python converts
        raise ConfigError(f"{origin}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{origin}: not valid YAML: nested too deeply") from None
    base_dir = path.resolve().parent
    # Every problem of the file, not only the first: one fix-and-retry round per mistake is slow at a field station.
    _collector.errors = errors = []
    try:
        cfg = _read(path, origin, data, base_dir, env)
    finally:
        _collector.errors = None
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return cfg


def _prompts(top: _Section, origin: str, base_dir: Path) -> tuple:
    raw_prompts = top.raw("prompts")
    if raw_prompts is _MISSING:
        return ()
    try:
        if isinstance(raw_prompts, str):
            p = Path(os.path.expanduser(raw_prompts))
            p = p if p.is_absolute() else base_dir / p
            if not p.is_file():
                top.fail("prompts", f"prompts file not found: {p}")
                return ()
            return tuple(load_prompts(p))
        if isinstance(raw_prompts, list):
            return tuple(load_prompts(raw_prompts, origin, base="prompts"))
    except ConfigError as e:  # one line per bad prompt (edge/prompts.py)
        for line in str(e).splitlines():
            _report(ConfigError(line))
        top.bad.add("prompts")
        return ()
    top.fail("prompts", f"must be a path to a prompts file or a list of prompts, got {show_value(raw_prompts)}")
    return ()


#: llama.cpp's sequence limit (edge/llm.py LLAMA_MAX_SEQ; not imported: the config stays free of the engine).
LLAMA_MAX_SEQ = 256


def llm_sequences(batch_max: int, prompts) -> int:
    """The LLM's sequences for these prompts: each window's base, plus the most beams a beam-searched prompt uses."""
    widths = [p.num_beams or 2 for p in prompts if p.kind in ("open", "caption")]
    return batch_max * (1 + max((w for w in widths if w > 1), default=0))


def _read(path: Path, origin: str, data, base_dir: Path, env) -> Config:
    top = _Section(origin, data, "", base_dir)

    device_id = top.string("device_id", pattern=_TOPIC_WORD,
                           hint="must be 1-64 letters, digits, '_', '.' or '-' (it is part of MQTT topics)")
    # systemd's StateDirectory= sets $STATE_DIRECTORY; an explicit state_dir wins.
    state_dir = top.path_value("state_dir", Path(env.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR))
    if state_dir.exists() and not state_dir.is_dir():
        top.fail("state_dir", f"{state_dir} exists and is not a directory")

    bundle = _bundle(top.sub("bundle", required=True))
    source = _source(top.sub("source", required=True))
    windowing = _windowing(top.sub("windowing"), origin, base_dir)

    prompts = _prompts(top, origin, base_dir)
    sequences = llm_sequences(windowing.batch_max, prompts)
    if sequences > LLAMA_MAX_SEQ and top.ok("prompts"):
        top.fail("windowing.batch_max", f"{windowing.batch_max} windows x (1 + the prompts' beams) = {sequences} "
                              f"llama.cpp sequences, more than its {LLAMA_MAX_SEQ}: lower batch_max or num_beams")

    mqtt = _mqtt(top.sub("mqtt", required=True))

    o = top.sub("outbox") or _Section(origin, {}, "outbox", base_dir)
    outbox = OutboxConfig(path=o.path_value("path", state_dir / "outbox.sqlite3"),
                          max_bytes=o.size("max_bytes", 64 * 1024 * 1024),
                          max_events=o.integer("max_events", 10, 100_000_000, 200_000),
                          lock_timeout_s=o.number("lock_timeout_s", 0.0, 86400, 60.0))
    o.done()
    h = top.sub("health") or _Section(origin, {}, "health", base_dir)
    health = HealthConfig(interval_s=h.number("interval_s", 0.1, 86400, 60.0))
    h.done()
    clips = _store(top.sub("clips"), "clips", origin, base_dir, state_dir)
    embeddings = _store(top.sub("embeddings"), "embeddings", origin, base_dir, state_dir)
    w = top.sub("watchdog") or _Section(origin, {}, "watchdog", base_dir)
    watchdog = WatchdogConfig(enabled=w.boolean("enabled", True))
    w.done()
    scheduling = _scheduling(top.sub("scheduling") or _Section(origin, {}, "scheduling", base_dir))
    privacy = _privacy(top.sub("privacy") or _Section(origin, {}, "privacy", base_dir), prompts,
                       prompts_ok=top.ok("prompts"))

    def section(name):
        return top.sub(name) or _Section(origin, {}, name, base_dir)

    site = _site(section("site"))
    detections = _detections(section("detections"), prompts)
    remote_control = _remote_control(section("remote_control"), prompts)
    if privacy.prompt_id is not None and privacy.prompt_id in remote_control.prompts:
        top.fail("remote_control", f"prompts: the privacy prompt {privacy.prompt_id!r} cannot be changed "
                                   "remotely (a disabled privacy prompt would save the clips it guards)")
    clip_server = _endpoint(section("clip_server"), 8089, public_url=True)
    if clip_server.enabled and not clips.enabled:
        top.fail("clip_server", "enabled needs clips.enabled: true (it serves the saved clips)")
    metrics = _endpoint(section("metrics"), 9108)
    top.done()

    return Config(path=path, device_id=device_id, bundle=bundle, source=source, windowing=windowing,
                  prompts=prompts, mqtt=mqtt, outbox=outbox, health=health, clips=clips, embeddings=embeddings,
                  state_dir=state_dir, watchdog=watchdog, scheduling=scheduling, privacy=privacy, site=site,
                  detections=detections, remote_control=remote_control, clip_server=clip_server, metrics=metrics)


def _globs(s: _Section, name: str, default: tuple) -> tuple:
    v = s.raw(name, default)
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x.strip() for x in items):
        s.fail(name, f"must be a path or glob, or a list of them, got {show_value(v)}")
        items = default
    out = []
    for x in items:
        p = os.path.expanduser(x.strip())
        out.append(p if os.path.isabs(p) else str(s.base_dir / p))
    return tuple(out)


def _scheduling(s: _Section) -> SchedulingConfig:
    t = s.sub("thermal") or _Section(s.origin, {}, s.key("thermal"), s.base_dir)
    shed_c = t.number("shed_above_c", -50.0, 200.0, 85.0)
    resume_c = t.number("resume_below_c", -50.0, 200.0, 75.0)
    if t.ok("resume_below_c", "shed_above_c") and resume_c >= shed_c:
        # Equal thresholds would switch a prompt on and off with every reading near the limit.
        t.fail("resume_below_c", f"must be below shed_above_c ({shed_c:g}) so that shedding has hysteresis, "
                                        f"got {resume_c:g}")
    thermal = ThermalConfig(enabled=t.boolean("enabled", True), zones=_globs(t, "zones", DEFAULT_THERMAL_ZONES),
                            shed_above_c=shed_c, resume_below_c=resume_c,
                            interval_s=t.number("interval_s", 0.0, 3600, 5.0))
    t.done()
    ld = s.sub("load") or _Section(s.origin, {}, s.key("load"), s.base_dir)
    shed_rtf = ld.number("shed_rtf", 0.0, 1000, 1.0, lo_open=True)
    resume_rtf = ld.number("resume_rtf", 0.0, 1000, 0.7)
    if ld.ok("resume_rtf", "shed_rtf") and resume_rtf >= shed_rtf:
        ld.fail("resume_rtf", f"must be below shed_rtf ({shed_rtf:g}) so that shedding has hysteresis, "
                                     f"got {resume_rtf:g}")
    shed_pending = ld.integer("shed_pending", 1, 1000, 3)
    resume_pending = ld.integer("resume_pending", 0, 1000, 0)
    if ld.ok("resume_pending", "shed_pending") and resume_pending >= shed_pending:
        ld.fail("resume_pending", f"must be below shed_pending ({shed_pending}) so that shedding has "
                                         f"hysteresis, got {resume_pending}")
    load = LoadConfig(enabled=ld.boolean("enabled", True), shed_rtf=shed_rtf, resume_rtf=resume_rtf,
                      shed_pending=shed_pending, resume_pending=resume_pending)
    ld.done()
    cfg = SchedulingConfig(thermal=thermal, load=load, shed_step_s=s.number("shed_step_s", 0.0, 86400, 10.0),
                           resume_step_s=s.number("resume_step_s", 0.0, 86400, 60.0))
    s.done()
    return cfg


def _privacy(s: _Section, prompts: tuple, prompts_ok: bool = True) -> PrivacyConfig:
    pid = s.string("prompt_id", None)
    if pid is not None and prompts_ok:  # with the prompts in error, "names no prompt" would only be noise
        spec = next((p for p in prompts if p.id == pid), None)
        if spec is None:
            s.fail("prompt_id", f"names no prompt (prompts: {', '.join(p.id for p in prompts)}), got {pid!r}")
        elif spec.kind != "yes_no":
            s.fail("prompt_id", f"must name a yes_no prompt; {pid!r} is a {spec.kind} prompt")
        # The privacy answer is needed on every window that could save a clip: no gaps in its asking.
        elif spec.every_n_windows != 1 or spec.active_hours:
            s.fail("prompt_id", f"prompt {pid!r} must be asked on every window (every_n_windows 1, no "
                                       "active_hours): a window it skips could save a clip of what it guards")
    cfg = PrivacyConfig(prompt_id=pid, withhold_events=s.boolean("withhold_events", False))
    if cfg.withhold_events and pid is None and s.ok("prompt_id"):
        s.fail("withhold_events", "needs privacy.prompt_id")
    s.done()
    return cfg


def _site(s: _Section) -> SiteConfig:
    lat = s.number("latitude", -90.0, 90.0, None)
    lon = s.number("longitude", -180.0, 180.0, None)
    if s.ok("latitude", "longitude") and (lat is None) != (lon is None):
        s.fail("longitude" if lon is None else "latitude", "give both latitude and longitude, or neither")
    s.done()
    return SiteConfig(latitude=lat, longitude=lon)


def _prompt_ids(s: _Section, name: str, prompts: tuple, kinds: tuple | None = None) -> tuple:
    v = s.raw(name, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        s.fail(name, f"must be a list of prompt ids, got {show_value(v)}")
        return ()
    known = {p.id: p for p in prompts}
    for i, pid in enumerate(v):
        if pid not in known:
            s.fail(name, f"[{i}] names no prompt (prompts: {', '.join(known)}), got {pid!r}")
        elif kinds and known[pid].kind not in kinds:
            s.fail(name, f"[{i}] must name a {' or '.join(kinds)} prompt; {pid!r} is a {known[pid].kind} prompt")
    return tuple(v)


def _notify(s: _Section, default: NotifyConfig) -> NotifyConfig:
    return NotifyConfig(cooldown_s=s.number("cooldown_s", 0.0, 30 * 86400, default.cooldown_s),
                        first_of_day=s.boolean("first_of_day", default.first_of_day))


def _detections(s: _Section, prompts: tuple) -> DetectionsConfig:
    quiet = s.number("quiet_s", 0.0, 86400, 30.0)
    max_age = s.number("max_live_age_s", 0.0, 30 * 86400, 300.0, lo_open=True)
    notify = _notify(s, NotifyConfig())
    overrides = []
    per = s.sub("prompts")
    if per is not None:
        known = {p.id: p for p in prompts}
        for pid in list(per.data):
            if pid not in known:
                per.fail(pid, f"names no prompt (prompts: {', '.join(known)})")
                per.used.add(pid)
                continue
            if known[pid].kind not in ("yes_no", "label"):
                per.fail(pid, f"only yes_no and label prompts have detections; {pid!r} is a "
                              f"{known[pid].kind} prompt")
                per.used.add(pid)
                continue
            sub = per.sub(pid, required=True)
            overrides.append((pid, _notify(sub, notify)))
            sub.done()
        per.done()
    b = s.sub("birdnet") or _Section(s.origin, {}, s.key("birdnet"), s.base_dir)
    birdnet = BirdnetConfig(enabled=b.boolean("enabled", False),
                            topic=b.string("topic", None, _PREFIX, "must be an MQTT topic (levels of letters, digits, "
                                           "'_', '.', '-' joined by '/', no wildcards)"),
                            prompts=_prompt_ids(b, "prompts", prompts, ("label",)))
    b.done()
    s.done()
    return DetectionsConfig(quiet_s=quiet, max_live_age_s=max_age, notify=notify, notify_prompts=tuple(overrides),
                            birdnet=birdnet)


def _remote_control(s: _Section, prompts: tuple) -> RemoteControlConfig:
    enabled = s.boolean("enabled", False)
    allow = s.raw("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        s.fail("allow", f"must be a list of actions ({', '.join(REMOTE_ACTIONS)}), got {show_value(allow)}")
        allow = []
    for i, a in enumerate(allow):
        if a not in REMOTE_ACTIONS:
            s.fail("allow", f"[{i}] must be one of {', '.join(REMOTE_ACTIONS)}, got {show_value(a)}")
    lo = s.number("threshold_min", 0.0, 1.0, 0.05)
    hi = s.number("threshold_max", 0.0, 1.0, 0.99)
    if s.ok("threshold_min", "threshold_max") and hi < lo:
        s.fail("threshold_max", f"must be >= threshold_min ({lo:g}), got {hi:g}")
    cfg = RemoteControlConfig(enabled=enabled, allow=tuple(allow),
                              prompts=_prompt_ids(s, "prompts", prompts, ("yes_no", "label")),
                              threshold_min=lo, threshold_max=hi)
    s.done()
    return cfg


def _endpoint(s: _Section, port: int, public_url: bool = False) -> EndpointConfig:
    cfg = EndpointConfig(enabled=s.boolean("enabled", False),
                         bind=s.string("bind", "127.0.0.1", re.compile(r"^[A-Za-z0-9_.:-]{1,253}$"),
                                       "must be an address or host name to listen on (127.0.0.1: this machine only)"),
                         port=s.integer("port", 1, 65535, port),
                         public_url=(s.string("public_url", None, re.compile(r"^https?://[^\s/]+(/\S*)?$"),
                                              "must be an http:// or https:// URL") if public_url else None))
    s.done()
    return cfg


def restart_needed(old: Config, new: Config) -> list[str]:
    """Sections that differ between two configs and only take effect after a restart."""
    live = {"prompts", "windowing", "path", "scheduling", "privacy"}
    changed = []
    for f in fields(Config):
        if f.name in live:
            continue
        if getattr(old, f.name) != getattr(new, f.name):
            changed.append(f.name)
    keys = ("window_s", "hop_s", "max_pending", "batch_max", "shared_batches")
    if any(getattr(old.windowing, k) != getattr(new.windowing, k) for k in keys):
        changed.append(f"windowing ({', '.join(keys)})")
    return changed


def read_mqtt_password(m: MqttConfig, origin: str, env=None) -> Secret | None:
    """The broker password, from its file or systemd credential; None when the config gives none.

    A password file may end with one newline (editors add one); it is not part of the password.
    """
    env = os.environ if env is None else env
    if m.password_file is not None:
        where, p = "mqtt.password_file", m.password_file
    elif m.password_credential is not None:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(f"{origin}: mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set; run under "
                              f"systemd with LoadCredential={m.password_credential}:/path/to/file, or use "
                              "password_file")
        where, p = "mqtt.password_credential", Path(creds) / m.password_credential
    else:
        return None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{origin}: {where}: cannot read {p} ({type(e).__name__}: "
                          f"{getattr(e, 'strerror', None) or e})") from None
    if text.endswith("\n"):
        text = text[:-1].removesuffix("\r")
    if not text:
        raise ConfigError(f"{origin}: {where}: {p} is empty")
    return Secret(text)

