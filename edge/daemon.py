"""`naturelm-edge run --config FILE`: the field daemon.

Threads, not processes (one model in memory, shared counters, no IPC):

  audio      the PortAudio callback (or a file/stdin reader) copies blocks into the RingBuffer, nothing else
  main       cuts windows out of the ring (WindowScheduler), pings the systemd watchdog, publishes health,
             handles signals
  inference  takes the oldest pending window, asks the PromptScheduler which prompts it gets (active hours; the
             lowest priorities shed while the device is hot or behind real time: edge/scheduler.py), runs the
             pipeline, applies the privacy prompt, saves clips and embeddings, stores the events in the outbox (which
             gives them their seq)
  mqtt       paho's network loop with reconnects (edge/mqtt.py)
  drainer    outbox -> MQTT, deleting each event once the broker acknowledged it (edge/drainer.py)

systemd: READY=1 once the bundle is loaded and warmed up; WATCHDOG=1 only while the inference worker finished a
window within the watchdog interval (or is idle with nothing pending), so a hung model stops the pings and systemd
restarts the service. A timer thread that pinged regardless would only prove that Python still runs. The watchdog
guards against hangs, not missing hardware: a microphone that is absent at boot or stops delivering is retried by
the source itself (a restart cannot plug it in; restarting every WatchdogSec only re-loaded the model), while the
main loop keeps pinging and the status says `degraded` (`no_audio`, "no audio since T") until audio flows again.
A window that fails (the model raised, the outbox could not be written) is counted and logged once per cause; the
worker goes on (`windows_failing` after WINDOWS_FAILING_AFTER in a row). SIGTERM: STOPPING=1, finish the window in
hand, give the broker a few seconds to take what the outbox holds, publish `stopped`. SIGHUP: re-read the config and apply the
prompt list, the gate threshold, the scheduling thresholds and the privacy settings without reloading the bundle.

Privacy: when `privacy.prompt_id` names a yes_no prompt, a window it answers Yes for saves no clip and no embedding
(an embedding of speech is still speech, to whoever has the encoder), and with `privacy.withhold_events` only the
privacy prompt's own event of that window is published. A window on which it gave no answer is treated as positive:
the failure mode is a missing clip, never a saved conversation.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edge import gpu_check
from edge.config import Config, load_config, read_mqtt_password, restart_needed
from edge.degraded import DegradedState
from edge.drainer import OutboxDrainer
from edge.errors import EXIT_NOPERM, EXIT_TEMPFAIL, ConfigError, NatureLMEdgeError
from edge.events import utc_iso
from edge.health import WindowCounters, build_health, health_line
from edge.live import LiveOutputs
from edge.mqtt import OFFLINE, STOPPED, MqttLink
from edge.outbox import BUSY_TIMEOUT_S, LOCKED, Outbox, OutboxError
from edge.remote import RemoteControl
from edge.ringbuffer import RingBuffer, WindowScheduler
from edge.scheduler import PromptScheduler
from edge.selfcheck import EncoderAccuracyError, check_encoder
from edge.sources import AudioSource, make_source, probe_source
from edge.stores import ClipStore, EmbeddingStore
from edge.systemd_notify import Notifier
from edge.thermal import ThermalReader

logger = logging.getLogger(__name__)

#: On SIGTERM, how long the broker gets to take what is left in the outbox (systemd's TimeoutStopSec is 90 s).
SHUTDOWN_FLUSH_S = 10.0
_TICK_S = 0.05
#: Windows failing in a row before the status turns `degraded` (windows_failing): one failure is news for the log,
#: three in a row (15 s at the default hop) is a condition a dashboard should show.
WINDOWS_FAILING_AFTER = 3
#: Events kept in memory while the outbox cannot be written (a full disk, a lock), stored with the first window that
#: can write again; beyond this the oldest are dropped and counted (`events_lost`).
MAX_HELD_EVENTS = 5000


def _one_line(e: BaseException) -> str:
    """An exception as one line: our own errors are written for people; anything else gets its type."""
    text = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, NatureLMEdgeError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fs_error(message: str, e: OSError) -> ConfigError:
    """A directory the daemon cannot use, with the exit status of its cause (systemd/README.md): a full disk (75) or
    a read-only or foreign-owned one (77) is worth a restart later, a path that cannot be a directory (2) is not."""
    err = ConfigError(message)
    err.exit_code = {errno.ENOSPC: EXIT_TEMPFAIL, errno.EDQUOT: EXIT_TEMPFAIL, errno.EROFS: EXIT_NOPERM,
                     errno.EACCES: EXIT_NOPERM, errno.EPERM: EXIT_NOPERM}.get(e.errno, err.exit_code)
    return err


def _open_pipeline_default(cfg: Config):
    from edge.pipeline import open_pipeline

    b = cfg.bundle
    return open_pipeline(b.path, list(cfg.prompts), device_id=cfg.device_id, provider=b.provider,
                         precision=b.encoder_precision, quantization=b.quantization, n_gpu_layers=b.n_gpu_layers,
                         state_dir=cfg.state_dir, verify=b.verify, gate_dbfs=cfg.windowing.gate_dbfs,
                         threads=b.encoder_threads, llm_threads=b.llm_threads,
                         max_batch=cfg.windowing.batch_max, shared_batches=cfg.windowing.shared_batches)


#: Test hook: tests replace this with a factory (cfg) -> pipeline when no real bundle is at hand.
_open_pipeline = _open_pipeline_default


class Daemon:
    def __init__(self, cfg: Config, notifier: Notifier | None = None):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.pipeline = None
        self.source: AudioSource | None = None
        self.ring: RingBuffer | None = None
        self.scheduler: WindowScheduler | None = None
        self.counters = WindowCounters(cfg.windowing.hop_s)
        # One reader of the thermal zones, off the inference thread; health and the scheduler see the same sample.
        th = cfg.scheduling.thermal
        self.thermal = ThermalReader(th.zones, th.interval_s)
        self.prompt_scheduler = PromptScheduler(cfg.scheduling, cfg.windowing.hop_s, cfg.privacy.prompt_id,
                                                read_temperatures=lambda zones: self.thermal.temperatures())
        self.privacy_counts = {"windows": 0, "clips_withheld": 0, "embeddings_withheld": 0, "events_withheld": 0}
        self.stores: dict = {}
        self._worker: threading.Thread | None = None
        self._watchdog_withheld: str | None = None
        #: Problems the daemon runs on with; the retained status says `degraded` while there is any (edge/degraded.py).
        self.degraded = DegradedState()
        self._held: list = []  # events of windows the outbox could not take yet (MAX_HELD_EVENTS)
        self.events_lost = 0  # held events dropped beyond MAX_HELD_EVENTS, or still held at exit
        self._failing_cause: str | None = None  # the cause of the current run of failing windows, logged once
        self._failing_since: str | None = None
        self._failing_reason: str | None = None
        self._no_audio_since: float | None = None  # the stall that `no_audio` reports
        self._worker_polled = time.monotonic()  # the inference worker last asked for a window
        self._batched = 0  # batches run from a backlog (windowing.batch_max)
        self._next_wd = self._next_health = 0.0  # monotonic times of the next watchdog ping and health report
        self.remote: RemoteControl | None = None
        self.endpoints: list = []  # clip server, metrics: whatever listens, to stop at the end
        self.last_health: dict | None = None

    # --- start-up ---------------------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.cfg
        password = read_mqtt_password(cfg.mqtt, str(cfg.path))  # fails before anything starts
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _fs_error(f"{cfg.path}: state_dir: cannot create {cfg.state_dir} ({e.strerror})", e) from None
        if cfg.source.type == "file":
            # Not audio is not a microphone that may come back: one line naming the file, no retries.
            try:
                probe_source(cfg.source)
            except NatureLMEdgeError as e:
                raise ConfigError(f"{cfg.path}: source.file.path: {e}") from None
        self.outbox = self._open_outbox()
        self.link = MqttLink(cfg.mqtt, cfg.device_id, password, degraded=self.degraded)
        self.link.max_live_age_s = cfg.detections.max_live_age_s
        # Entities expire after three missed heartbeats (the states are republished with every health report).
        self.link.expire_after_s = max(60, int(3 * cfg.health.interval_s))
        self.drainer = OutboxDrainer(self.outbox, self.link, cfg.mqtt.max_inflight, cfg.detections.max_live_age_s)
        self.live = LiveOutputs(cfg, self.link)
        self.remote = RemoteControl(cfg.remote_control, self.link, self) if cfg.remote_control.enabled else None
        for name, store_cls in (("clips", ClipStore), ("embeddings", EmbeddingStore)):
            store_cfg = getattr(cfg, name)
            if store_cfg.enabled:
                try:
                    self.stores[name] = store_cls(store_cfg)
                except OSError as e:
                    raise _fs_error(f"{cfg.path}: {name}.dir: cannot use {store_cfg.dir} ({e.strerror})", e) from None
        self._start_endpoints()

    def _start_endpoints(self) -> None:
        """The listening endpoints, each off unless enabled (edge/clipserver.py, edge/metrics.py)."""
        cfg = self.cfg
        if cfg.clip_server.enabled:
            from edge.clipserver import ClipServer

            try:
                self.endpoints.append(ClipServer(cfg.clip_server, cfg.clips.dir))
            except OSError as e:
                raise ConfigError(f"{cfg.path}: clip_server.port: cannot listen on {cfg.clip_server.bind}:"
                                  f"{cfg.clip_server.port} ({e.strerror})") from None
            self.endpoints[-1].start()
        if cfg.metrics.enabled:
            from edge.metrics import MetricsServer

            self.endpoints.append(MetricsServer(cfg.metrics, lambda: self.last_health, cfg.device_id, str(cfg.path)))

    def _open_outbox(self) -> Outbox:
        """The outbox, by the daemon's rule for a file it cannot use (systemd/README.md, "Exit statuses"): a write
        lock held by another process is waited out, backing off, for up to outbox.lock_timeout_s, then the daemon
        exits with 75; a full disk exits with 75, a read-only file system or a permission problem with 77, any other
        I/O error with 74, each with one line naming the path and the cause. The file is never replaced (only a
        corrupt one is, by Outbox itself), so its queued events are there on the next start."""
        o = self.cfg.outbox
        deadline = time.monotonic() + o.lock_timeout_s
        first = True
        while True:
            # SQLite's busy handler does the waiting (it polls the lock, backing off); the first try is short, so
            # that the log says at once what the daemon is waiting for.
            wait = max(0.0, min(1.0 if first else BUSY_TIMEOUT_S, deadline - time.monotonic()))
            try:
                return Outbox(o.path, o.max_bytes, o.max_events, open_timeout_s=wait)
            except OutboxError as e:
                left = deadline - time.monotonic()
                if e.kind != LOCKED:
                    raise
                if left <= 0 or self._stop.is_set():
                    raise OutboxError(f"{e}; gave up after {o.lock_timeout_s:g} s (outbox.lock_timeout_s)",
                                      LOCKED) from None
                if first:
                    logger.warning("%s; waiting up to %.0f s more for the lock (outbox.lock_timeout_s)", e, left)
                first = False

    def _load_model(self) -> None:
        t0 = time.monotonic()
        self.notifier.status("loading the model bundle")
        # On a GPU board a model that fails to open with the GPU is reopened on the CPU, and the GPU's absence is
        # checked from inside this process (the unit's sandbox): either way `gpu_fallback` says why (edge/gpu_check.py).
        self.pipeline, gpu_error = gpu_check.open_model(self.cfg, _open_pipeline)
        gpu_check.report(self.cfg, self.pipeline.info, self.degraded, gpu_error)
        self._check_encoder()
        info = dict(self.pipeline.info)
        logger.info("model bundle %s loaded and warmed up in %.1f s: encoder %s/%s, LLM %s, offload %s",
                    info.get("bundle_id"), time.monotonic() - t0, info.get("encoder_provider"),
                    info.get("encoder_precision"), info.get("quantization"), info.get("llm_offload"))
        clip_s = getattr(self.pipeline, "clip_seconds", None)
        if clip_s is not None and self.cfg.windowing.window_s > clip_s + 1e-6:
            logger.warning("windowing.window_s is %g s but the model hears %g s: the end of every window is cut off",
                           self.cfg.windowing.window_s, clip_s)
        self.link.set_discovery(self.cfg.prompts)
        self.live.reset_states(self.cfg.prompts)

    def _check_encoder(self) -> None:
        """The encoder as opened here (precision, the provider it got, the TensorRT engine) against the bundle's
        reference outputs, once per bundle, provider and engine (cached in state_dir): edge/selfcheck.py."""
        encoder = getattr(self.pipeline, "encoder", None)
        if encoder is None:  # a pipeline without an ONNX encoder (tests' stand-ins)
            return
        self.notifier.status("checking the audio encoder against the bundle's reference")
        result = check_encoder(encoder, self.cfg.state_dir)
        if result is None:
            return
        self.pipeline.info["encoder_check"] = {"passed": result.passed, "mean_cosine": round(result.mean_cosine, 6),
                                               "min_cosine": round(result.min_cosine, 6),
                                               "int8_kernel": result.cpu.get("int8_kernel"),
                                               "accepted_loss": not result.passed}
        if result.passed:
            self.degraded.clear("encoder_accuracy")
            return
        if not self.cfg.bundle.accept_encoder_loss:
            raise EncoderAccuracyError(
                f"{result.line()}; refusing to run on it: choose another bundle.encoder_precision in {self.cfg.path}, "
                "or set bundle.accept_encoder_loss: true to run on it anyway")
        self.degraded.set("encoder_accuracy", f"{result.line()} (accepted: bundle.accept_encoder_loss)")

    def _apply_gate(self, dbfs) -> None:
        """SIGHUP: the pipeline's activity gate takes the new threshold in place (edge.windowing.ActivityGate)."""
        gate = getattr(self.pipeline, "gate", None)
        if gate is not None:
            gate.threshold_dbfs = dbfs

    def _open_source(self) -> bool:
        """Open the source; a microphone is retried with backoff (it may be plugged in late) while the watchdog is
        still fed and the status says `no_audio`. False if stopped first."""
        delay = self.cfg.source.reconnect_min_delay_s
        since = utc_iso(datetime.now(timezone.utc))
        while not self._stop.is_set():
            source = make_source(self.cfg.source)
            try:
                source.open()
            except NatureLMEdgeError as e:
                if self.cfg.source.type != "mic":  # a file or a pipe does not get better by waiting
                    raise ConfigError(f"{self.cfg.path}: source.{self.cfg.source.type}: {e}") from None
                self.degraded.set("no_audio", f"no audio since {since}: cannot open the microphone "
                                              f"({str(e).splitlines()[0]})")
                logger.error("cannot open the audio source: %s; retrying in %.1f s", e, delay)
                if self._wait(delay, alive=True):
                    return False
                delay = min(2 * delay, self.cfg.source.reconnect_max_delay_s)
                continue
            self.source = source
            frames = max(1, int(self.cfg.source.ring_s * source.sample_rate))
            self.ring = RingBuffer(frames, source.channels, source.sample_rate)
            w = self.cfg.windowing
            self.scheduler = WindowScheduler(self.ring, w.window_s, w.hop_s, w.max_pending,
                                             lossless=not source.paced)
            source.start(self.ring)
            logger.info("audio source %s: %d Hz, %d channel(s), windows of %g s every %g s", source.name,
                        source.sample_rate, source.channels, w.window_s, w.hop_s)
            return True
        return False

    def _wait(self, seconds: float, alive: bool = False) -> bool:
        """Sleep that still serves signals (and, `alive`, the watchdog and health); True when asked to stop."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if alive:
                self._keep_alive()
            if self._stop.wait(min(_TICK_S * 4, max(0.0, end - time.monotonic()))):
                return True
        return self._stop.is_set()

    def _keep_alive(self) -> None:
        """What the main loop does whatever else happens: watchdog pings (when no window hangs), health reports, and
        the `no_audio` reason."""
        now = time.monotonic()
        wd = self.notifier.watchdog_s if self.cfg.watchdog.enabled else None
        if wd and now >= self._next_wd:
            self._ping_watchdog()
            self._next_wd = now + wd / 2  # twice per interval, as sd_watchdog_enabled(3) advises
        self._check_audio()
        if now >= self._next_health:
            self._publish_health()
            self._next_health = now + self.cfg.health.interval_s

    def _check_audio(self) -> None:
        """`no_audio` while the source is stalled (the source reopens it itself); cleared once frames flow again."""
        s = self.source
        if s is None:
            return  # still opening: _open_source says why
        stalled = s.stalled_since
        if stalled is not None:
            if self._no_audio_since != stalled:
                self._no_audio_since = stalled
                t = datetime.now(timezone.utc) - timedelta(seconds=time.monotonic() - stalled)
                self.degraded.set("no_audio", f"no audio from {s.name} since {utc_iso(t)}")
        elif self.ring is not None and self.ring.write_pos > 0:
            self._no_audio_since = None
            self.degraded.clear("no_audio")

    # --- inference worker --------------------------------------------------------------------------------------------

    def _inference(self) -> None:
        last_fault = None
        while not self._stop.is_set():
            self._worker_polled = time.monotonic()
            try:
                if not self._next_window():
                    break
            except Exception as e:  # the last line of defence: this thread is the analysis
                # Not a window's failure (those are handled in _next_window) but the bookkeeping around one;
                # a traceback once per cause.
                if _one_line(e) != last_fault:
                    logger.exception("inference worker: bookkeeping around a window failed; carrying on")
                    last_fault = _one_line(e)
                self._stop.wait(0.2)

    def _next_window(self) -> bool:
        """Take and run the next pending window, if any; False when the daemon is stopping."""
        w = self.scheduler.get(timeout=0.2)
        if w is None:
            return True
        if self._stop.is_set():  # taken just as the stop came: left, like the other pending windows
            return False
        batch, ahead, t0 = self._backlog(w)
        for w in batch:
            self.counters.started()
            try:
                self._window(w, ahead.get(id(w)))
            except Exception as e:  # noqa: BLE001 - no window may end the analysis
                self._window_failed(w, e)
            else:
                self._window_succeeded(w)
            finally:
                self.prompt_scheduler.window_done((time.monotonic() - t0) / len(batch))
                t0 = time.monotonic()
                self.live.advance(w.info)  # every window moves the detections' clock, whatever became of it
        return True

    def _backlog(self, w) -> tuple[list, dict, float]:
        """Behind real time (windows waiting) with windowing.batch_max > 1: take up to that many waiting windows and
        run them through the batched pipeline in one go. Returns the windows, their results by id (each window whose
        batch failed, or whose prompts the scheduler trims, runs again alone in _window) and the start time."""
        t0 = time.monotonic()
        batch = [w]
        while len(batch) < self.cfg.windowing.batch_max:
            more = self.scheduler.get(timeout=0)
            if more is None:
                break
            batch.append(more)
        if len(batch) == 1:
            return batch, {}, t0
        (logger.debug if self._batched else logger.info)(
            "behind real time: %d waiting windows in one batch (windowing.batch_max %d)", len(batch),
            self.cfg.windowing.batch_max)
        self._batched += 1
        try:
            results = self.pipeline.process_batch([(x.samples, x.sample_rate, x.info) for x in batch],
                                                  self.source.name)
        except Exception as e:  # noqa: BLE001 - each window then runs, and fails or not, on its own
            logger.debug("batch of %d windows failed (%s): one at a time", len(batch), _one_line(e))
            return batch, {}, t0
        return batch, {id(x): r for x, r in zip(batch, results)}, t0

    def _window_failed(self, w, e: Exception) -> None:
        """Counted, and logged once per cause (not once per window: a full disk fails every window the same way)."""
        cause = _one_line(e)
        # The same fault in other words (SQLite's "database or disk is full", the OS's "No space left") is one cause.
        key = f"outbox {e.kind}" if isinstance(e, OutboxError) else cause
        self.counters.finished(ok=False, error=cause, window=w.info.index)
        n = self.counters.failed_in_a_row
        if self._failing_since is None:
            self._failing_since = utc_iso(datetime.now(timezone.utc))
        if key != self._failing_cause:
            # A traceback only for what is not a known kind of failure (a bug), and only once per cause.
            known = isinstance(e, (NatureLMEdgeError, OSError))
            logger.error("window %d (%.1f s) failed: %s%s", w.info.index, w.info.offset_s, cause,
                         f" ({n} in a row; further failures of this cause are counted in health, not logged)"
                         if n > 1 else "", exc_info=None if known else e)
            self._failing_cause, self._failing_reason = key, cause
        else:
            logger.debug("window %d failed: %s", w.info.index, cause)
        if n >= WINDOWS_FAILING_AFTER:
            self.degraded.set("windows_failing", f"windows failing since {self._failing_since}: {self._failing_reason}")

    def _window_succeeded(self, w) -> None:
        if self._failing_cause is not None:
            logger.info("window %d processed: windows succeed again after %d failure(s) in a row", w.info.index,
                        self.counters.last_streak)
            self._failing_cause = self._failing_since = None
            self.degraded.clear("windows_failing")

    def _store(self, events: list) -> None:
        """Into the outbox, with any events held from windows it could not take. Raises OutboxError, holding them."""
        batch = self._held + events
        if not batch:
            return
        try:
            self.outbox.add(batch)
        except OutboxError:
            over = len(batch) - MAX_HELD_EVENTS
            if over > 0:
                self.events_lost += over
                logger.error("dropped the %d oldest event(s) held in memory (%d lost so far): the outbox has not "
                             "been writable for %d events", over, self.events_lost, len(batch))
                batch = batch[over:]
            self._held = batch
            raise
        if self._held:
            logger.info("outbox %s writable again: stored %d event(s) held in memory", self.outbox.path,
                        len(self._held))
        self._held = []

    def _window(self, w, result=None) -> None:
        """One window, start to end (`result`: the pipeline's, already run in a batch with every prompt). Raises on
        any failure (the caller counts and logs it)."""
        cfg = self.cfg
        plan = self.prompt_scheduler.plan(cfg.prompts, w.info, pending=self.scheduler.pending(),
                                          paced=self.source.paced)
        if not plan.prompts and "embeddings" not in self.stores:
            # Every prompt is outside its active hours: nothing to ask, so no model work at all.
            if self._held:
                self._store([])
            self.counters.finished(ok=True, idle=True)
            return
        if plan.full:
            if result is None:
                result = self.pipeline.process(w.samples, w.sample_rate, w.info, self.source.name)
        else:
            result = self.pipeline.process(w.samples, w.sample_rate, w.info, self.source.name,
                                           prompts=plan.prompts)
        events = list(result.events)
        private = self._private(events, result)
        # A clip is for a detection; the privacy prompt's own Yes is not one.
        wants_clip = any(e.positive for e in events if e.prompt_id != cfg.privacy.prompt_id)
        if private and cfg.privacy.withhold_events:
            kept = [e for e in events if e.prompt_id == cfg.privacy.prompt_id]
            self.privacy_counts["events_withheld"] += len(events) - len(kept)
            events = kept
        clips = self.stores.get("clips")
        if clips is not None and wants_clip:
            if private:
                self.privacy_counts["clips_withheld"] += 1
            else:
                path = clips.save(w.samples, w.sample_rate, w.info)
                if path is not None:
                    for e in events:
                        e.clip = str(path)
        emb = self.stores.get("embeddings")
        if emb is not None and getattr(result, "embedding", None) is not None:
            if private:
                self.privacy_counts["embeddings_withheld"] += 1
            else:
                emb.save(result.embedding, w.info, self.source.name)
        self.live.observe(w.info, events, self.source.name, float(result.timings.get("total", 0.0)))
        self._store(events)
        self.counters.finished(ok=True, gated=bool(result.gated), events=len(events))
        logger.debug("window %d at %.1f s: %s, %d event(s)%s", w.info.index, w.info.offset_s,
                     "gated" if result.gated else "processed", len(events),
                     f", shed {', '.join(plan.shed)}" if plan.shed else "")

    def _private(self, events: list, result) -> bool:
        """The privacy prompt flagged this window (or, having run the model, gave no answer: fail closed)."""
        pid = self.cfg.privacy.prompt_id
        if pid is None or result.gated:
            return False
        answer = next((e for e in events if e.prompt_id == pid), None)
        private = answer is None or bool(answer.positive)
        if private:
            self.privacy_counts["windows"] += 1
        return private

    # --- watchdog, health, reload ---------------------------------------------------------------------------------

    def _liveness(self, interval: float) -> tuple[str, str] | None:
        """None when inference is alive within `interval`, else (what, why). Audio is not judged here: a missing
        microphone is `no_audio` (degraded), not a hang to restart for."""
        if self.scheduler is None:
            return None
        c = self.counters
        busy = c.busy_since
        if busy is not None and time.monotonic() - busy > interval:
            return "inference", f"inference has been on one window for {time.monotonic() - busy:.0f} s"
        # Between windows the worker polls for the next one every 0.2 s; a worker that stopped polling while windows
        # wait is dead or stuck outside a window. (Failed windows are finished windows: a full disk is a fault to
        # report, not a hang to restart for; and a long silence of the microphone is not a hang either.)
        idle = time.monotonic() - self._worker_polled
        if busy is None and self.scheduler.pending() and idle > interval:
            return "inference", f"the inference worker has taken no window for {idle:.0f} s with windows pending"
        return None

    def _ping_watchdog(self) -> None:
        problem = self._liveness(self.notifier.watchdog_s)
        if problem is None:
            if self._watchdog_withheld:
                logger.info("alive again: watchdog pings resume")
                self._watchdog_withheld = None
            self.notifier.watchdog()
        elif problem[0] != self._watchdog_withheld:  # once per outage, not once per check
            logger.warning("withholding the systemd watchdog: %s", problem[1])
            self._watchdog_withheld = problem[0]

    def health(self) -> dict:
        h = self._health()
        if hasattr(self, "live"):
            h["detections"] = self.live.health()
            h["late_events"] = {"replayed": self.drainer.replayed, "late": self.drainer.late,
                                "live_dropped_late": self.link.live_dropped_late}
        if self.remote is not None:
            h["remote_control"] = {"accepted": self.remote.accepted, "refused": self.remote.refused}
        return h

    def _health(self) -> dict:
        return build_health(device_id=self.cfg.device_id, started_monotonic=self.started, counters=self.counters,
                            rtf=self.counters.take_rtf(), scheduler=self.scheduler, ring=self.ring,
                            source=self.source, outbox=self.outbox, drainer=self.drainer, link=self.link,
                            model=dict(self.pipeline.info) if self.pipeline is not None else {},
                            state_dir=self.cfg.state_dir, stores=self.stores,
                            scheduling=self.prompt_scheduler.health(),
                            privacy=dict(self.privacy_counts) if self.cfg.privacy.prompt_id else None,
                            degraded=self.degraded.snapshot(),
                            events_held=len(self._held), events_lost=self.events_lost,
                            temperatures=self.thermal.temperatures(),
                            thermal_unresponsive=self.thermal.unresponsive())

    def publish_health_now(self) -> None:
        """Remote control's `health` action."""
        self._publish_health()

    def apply_prompts(self, prompts) -> None:
        """Remote control: run with these prompts (the entities of every configured prompt stay)."""
        self.pipeline.set_prompts(list(prompts))
        self.cfg = replace(self.cfg, prompts=tuple(prompts))
        self.live.set_prompts(self.cfg.prompts, drop_removed=False)

    def _publish_health(self) -> None:
        h = self.last_health = self.health()
        self.link.publish_health(h)
        logger.info("%s", health_line(h))

    def _do_reload(self) -> None:
        try:
            new = load_config(self.cfg.path)
        except ConfigError as e:
            logger.error("reload refused, keeping the running configuration: %s", "; ".join(e.lines()))
            return
        later = restart_needed(self.cfg, new)
        try:
            self.pipeline.set_prompts(list(new.prompts))
        except NatureLMEdgeError as e:
            logger.error("reload refused, keeping the running prompts: %s", e)
            return
        self._apply_gate(new.windowing.gate_dbfs)
        self.prompt_scheduler.configure(new.scheduling, new.privacy.prompt_id)
        self.thermal.configure(new.scheduling.thermal.zones, new.scheduling.thermal.interval_s)
        self.cfg = replace(self.cfg, prompts=new.prompts,
                           windowing=replace(self.cfg.windowing, gate_dbfs=new.windowing.gate_dbfs),
                           scheduling=new.scheduling, privacy=new.privacy)
        self.link.set_discovery(self.cfg.prompts)
        self.live.set_prompts(self.cfg.prompts)
        if self.remote is not None:
            self.remote.reset()
        logger.info("reloaded %s: %d prompt(s) (%s), gate %s", self.cfg.path, len(new.prompts),
                    ", ".join(p.id for p in new.prompts),
                    "off" if new.windowing.gate_dbfs is None else f"{new.windowing.gate_dbfs:g} dBFS")
        if later:
            logger.warning("changes to %s take effect only after a restart", ", ".join(later))

    # --- main loop ----------------------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        def stop(signum, frame):
            if self._stop.is_set():
                return
            logger.info("%s: stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda s, f: self._reload.set())

    def run(self, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or the end of a finite source). `install_signals=False` lets a test run the
        daemon on a thread other than the main one and stop it with `stop()`."""
        if install_signals:
            self._install_signals()
        logger.info("naturelm-edge daemon: %s", self.cfg.summary())
        self._prepare()
        self.thermal.start()
        self.link.start()
        self.drainer.start()
        self._next_wd, self._next_health = time.monotonic(), time.monotonic() + self.cfg.health.interval_s
        clean = False
        try:
            self._load_model()
            if not self._stop.is_set():
                self.notifier.ready(f"model loaded; device {self.cfg.device_id}")
                if self._open_source():
                    self._worker = threading.Thread(target=self._inference, name="inference", daemon=True)
                    self._worker.start()
                    self._main_loop()
            clean = True
        finally:
            self._shutdown(clean)
        return 0

    def _main_loop(self) -> None:
        draining = False
        while not self._stop.is_set():
            self.scheduler.pump()
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
            self._keep_alive()
            self.live.tick()
            if self.remote is not None:
                self.remote.process()
            if self._source_done():
                # A finite source (file, stdin) is done: deliver everything, then stop.
                if not draining:
                    draining = True
                    self._publish_health()
                    logger.info("source finished; waiting for %d event(s) to reach the broker", self.outbox.depth)
                if self.outbox.depth == 0:
                    logger.info("all events delivered")
                    break
            time.sleep(_TICK_S)

    def stop(self) -> None:
        self._stop.set()

    def _source_done(self) -> bool:
        """A finite source ended and every window it gave has been processed (or failed, or was dropped)."""
        s, c = self.scheduler, self.counters
        return s.finished and c.processed + c.failed + s.windows_dropped >= s.windows_cut

    def _shutdown(self, clean: bool) -> None:
        """Stop in order: audio, the window in hand, a last chance for the outbox, then `stopped` (or, when leaving
        on an error, `offline`: the same word the last will would have said)."""
        self._stop.set()
        self.notifier.stopping("stopping")
        if self.source is not None:
            self.source.stop()
        if self._worker is not None:
            self._worker.join(timeout=60.0)  # the window in hand is finished, not abandoned (TimeoutStopSec=90)
            left = self.scheduler.pending()
            if left:
                logger.info("%d pending window(s) not processed at shutdown", left)
        if hasattr(self, "drainer"):
            if self._held:
                try:
                    self._store([])
                except OutboxError as e:
                    self.events_lost += len(self._held)
                    logger.error("%d event(s) held in memory are lost at exit: %s", len(self._held), e)
            if self.link.connected.is_set() and self.outbox.depth:
                ok = self.drainer.flush(SHUTDOWN_FLUSH_S)
                if not ok:
                    logger.warning("%d event(s) stay in the outbox for the next start", self.outbox.depth)
            elif self.outbox.depth:
                logger.info("%d event(s) stay in the outbox for the next start (broker not connected)",
                            self.outbox.depth)
            self.live.end_all()  # a stopped recorder hears nothing: its entities go OFF, not stale ON
            self._publish_health_quietly()
            self.drainer.stop()
            self.link.stop(STOPPED if clean else OFFLINE)
            self.outbox.close()
        for endpoint in self.endpoints:
            endpoint.stop()
        if self.pipeline is not None and hasattr(self.pipeline, "close"):
            self.pipeline.close()
        self.thermal.stop()
        self.notifier.close()
        logger.info("stopped")

    def _publish_health_quietly(self) -> None:
        try:
            self._publish_health()
        except Exception as e:  # noqa: BLE001 - the last report is a courtesy; shutdown goes on regardless
            logger.debug("final health report failed: %s", e)


def run_daemon(config_path: Path) -> int:
    cfg = load_config(config_path)
    return Daemon(cfg).run()
