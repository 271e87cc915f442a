"""Who runs the windows of an archive: this process, N local processes, or Ray actors; one model per worker.

Every backend runs the same generator, `process_file`, over whole recordings (a file's windows stay in order in one
worker) and hands its messages to the one writer in the parent (edge/infer.py), which alone touches the outputs and
the ledger. So the outputs do not depend on the backend, and a worker lost mid-file loses nothing: its file is
still "running" in the ledger and `--resume` runs it again, after removing its partial lines.

Messages, as tuples: ("start", worker, path), ("window", worker, path, WindowInfo, events, embedding, error),
("end", worker, path, error), ("fatal", worker, error). error is None or one line.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import NatureLMEdgeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileTask:
    path: str  # as opened
    source: str  # written into its events
    window_s: float
    hop_s: float


@dataclass(frozen=True)
class PipelineArgs:
    """What a worker needs to open its own pipeline (picklable: sent to processes and Ray actors)."""

    bundle: str
    prompts: tuple
    device_id: str
    provider: str = "cpu"
    precision: str = "fp32"
    quantization: str | None = None
    n_gpu_layers: int | None = None
    gate_dbfs: float | None = None
    threads: int = 0  # 0: every usable core (one worker)
    verify: str = "full"
    batch: int = 1
    shared_batches: bool = False
    with_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    def open(self):
        from edge.pipeline import open_pipeline

        return open_pipeline(Path(self.bundle), list(self.prompts), device_id=self.device_id, provider=self.provider,
                             precision=self.precision, quantization=self.quantization, verify=self.verify,
                             gate_dbfs=self.gate_dbfs, n_gpu_layers=self.n_gpu_layers, threads=self.threads,
                             llm_threads=self.threads or None, max_batch=self.batch,
                             shared_batches=self.shared_batches)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, NatureLMEdgeError) else f"{type(e).__name__}: {text}"


def process_file(pipeline, task: FileTask, batch: int = 1, with_embeddings: bool = False, worker: int = 0):
    """Messages for one recording: its windows in order, `batch` at a time. A window that fails is reported with its
    error and the file goes on; a file that cannot be read ends with its error."""
    from edge.infer import iter_windows

    yield ("start", worker, task.path)
    pending: list = []

    def run(items):
        try:
            results = (pipeline.process_batch(items, task.source) if len(items) > 1
                       else [pipeline.process(*items[0], source=task.source)])
        except Exception as e:  # noqa: BLE001 (a window's failure is recorded; the file goes on)
            if len(items) > 1:  # find the failing window(s): one at a time
                logger.warning("%s: a batch of %d windows from %.1f s failed (%s); running them one by one",
                               task.source, len(items), items[0][2].offset_s, _one_line(e))
                for item in items:
                    yield from run([item])
                return
            yield ("window", worker, task.path, items[0][2], [], None, _one_line(e))
            return
        for (_, _, window), r in zip(items, results):
            yield ("window", worker, task.path, window, r.events, r.embedding if with_embeddings else None, None)

    try:
        for item in iter_windows(Path(task.path), task.window_s, task.hop_s):
            pending.append(item)
            if len(pending) >= batch:
                yield from run(pending)
                pending = []
        if pending:
            yield from run(pending)
    except NatureLMEdgeError as e:
        yield ("end", worker, task.path, _one_line(e))
        return
    except Exception as e:  # an error nobody foresaw fails this file, loudly, not the worker silently
        logger.error("%s: unexpected error, the file is marked failed (-v shows the traceback): %s", task.source,
                     _one_line(e))
        logger.debug("%s: traceback", task.source, exc_info=True)
        yield ("end", worker, task.path, f"unexpected error: {_one_line(e)}")
        return
    yield ("end", worker, task.path, None)


def threads_per_worker(workers: int) -> int:
    from edge.llm import _usable_cpus

    return max(1, _usable_cpus() // max(1, workers))


# --- this process ----------------------------------------------------------------------------------------------------


class InlineBackend:
    def __init__(self, args: PipelineArgs):
        self.args = args
        self.pipeline = args.open()

    def run(self, tasks):
        for task in tasks:
            yield from process_file(self.pipeline, task, self.args.batch, self.args.with_embeddings)

    def close(self):
        self.pipeline.close()


# --- local processes -----------------------------------------------------------------------------------------------


def _process_main(worker: int, args: PipelineArgs, conn) -> None:
    """A worker process: open the model, then ask the parent for a file, run it, ask again, until it sends None. Its
    own pipe to the parent, no queue shared with other workers: a worker killed while writing (the OOM killer, a
    SIGKILL) cannot leave a lock held that the others would wait on for ever."""
    logging.basicConfig(level=logging.WARNING, format=f"naturelm-edge worker {worker}: %(message)s")
    try:
        pipeline = args.open()
    except Exception as e:  # noqa: BLE001 (reported to the parent, which stops the run with it)
        conn.send(("fatal", worker, _one_line(e)))
        return
    try:
        while True:
            conn.send(("ready", worker))
            task = conn.recv()
            if task is None:
                break
            for msg in process_file(pipeline, task, args.batch, args.with_embeddings, worker):
                conn.send(msg)
    except (EOFError, BrokenPipeError):  # the parent is gone: nothing to report to
        pass
    finally:
        pipeline.close()


class ProcessBackend:
    """N processes (spawned: llama.cpp and onnxruntime hold threads that fork would copy half-alive), each with
    cores // N threads for onnxruntime and llama.cpp. The parent hands each worker its next file when it asks, over
    that worker's own pipe, and watches the pipes and the processes together: a worker that dies has its file (the
    one it was given) reported lost, whatever it was doing at the time."""

    def __init__(self, args: PipelineArgs, workers: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.args = args
        self.workers = workers
        self.procs: list = []
        self.conns: list = []

    def run(self, tasks):
        from collections import deque
        from multiprocessing.connection import wait

        todo = deque(tasks)
        for i in range(self.workers):
            parent, child = self.ctx.Pipe(duplex=True)
            p = self.ctx.Process(target=_process_main, args=(i, self.args, child), daemon=True,
                                 name=f"naturelm-edge-worker-{i}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        given: dict[int, str] = {}  # worker -> the file it was handed and has not ended
        alive = set(range(self.workers))

        def gone(i: int):
            alive.discard(i)
            p = self.procs[i]
            p.join(timeout=5)
            lost = given.pop(i, None)
            if lost is not None or p.exitcode not in (0, None):
                logger.error("worker %d (pid %s) exited with code %s%s", i, p.pid, p.exitcode,
                             f" while running {lost}: its file is left unfinished in the ledger "
                             "(--resume runs it again)" if lost else "")
            if lost is not None:
                yield ("lost", i, lost)

        while alive:
            by_conn = {self.conns[i]: i for i in alive}
            by_proc = {self.procs[i].sentinel: i for i in alive}
            for ready in wait(list(by_conn) + list(by_proc)):
                i = by_conn.get(ready, by_proc.get(ready))
                if i not in alive:
                    continue
                conn = self.conns[i]
                try:
                    while conn.poll():  # everything it said before it ended, then its end
                        msg = conn.recv()
                        kind = msg[0]
                        if kind == "ready":
                            task = todo.popleft() if todo else None
                            if task is not None:
                                given[i] = task.path  # before sending: if the send fails, the file is lost, not dropped
                            conn.send(task)
                            continue
                        if kind == "end":
                            given.pop(i, None)
                        yield msg
                        if kind == "fatal":
                            return
                except (EOFError, OSError):  # its end of the pipe closed: it exited
                    yield from gone(i)
                    continue
                if ready in by_proc:
                    yield from gone(i)
        # Files no worker was left to take (every worker lost): never run.
        for t in todo:
            logger.error("%s was never run (no worker was left): --resume runs it", t.source)
            yield ("lost", -1, t.path)

    def close(self):
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# --- Ray ---------------------------------------------------------------------------------------------------------


RAY_HINT = "--ray needs Ray: pip install 'naturelm-edge[ray]'"
#: Ray replaces a lost actor (its process killed, OOM, its node gone) this many times, each a fresh process that
#: loads the model again; after that the actor stays dead and the others carry on.
RAY_MAX_RESTARTS = 3
#: How long a worker may wait for the cluster to place it before we say so (it keeps waiting: an autoscaler may be
#: adding a node).
RAY_PLACEMENT_WARN_S = 60.0
#: How long --ray-address may take to accept a connection.
RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str) -> None:
    """Fail fast, on one line naming the address, when nothing listens there: Ray itself retries a refused or
    unreachable address for a minute or more before giving up. `auto` and `local` are Ray's own words (the cluster
    this machine last started; a new private one) and are left to it."""
    import importlib.util
    import socket
    from urllib.parse import urlsplit

    from edge.errors import ConfigError

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in ("", "ray"):
        raise ConfigError(f"--ray-address {address}: give host:port (the head's GCS port, 6379 by default) or "
                          "ray://host:port (the Ray Client port, 10001 by default)")
    if parts.scheme == "ray" and importlib.util.find_spec("grpc") is None:
        raise ConfigError(f"--ray-address {address}: a ray:// address goes through Ray Client, which needs "
                          "pip install 'ray[client]'; or run infer on a node of the cluster with the head's "
                          "host:port")
    try:
        port = parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        raise ConfigError(f"--ray-address {address}: the port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise ConfigError(f"--ray-address {address}: no host name")
    try:
        with socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__  # socket.timeout has no strerror
        start = (f"ray start --head --ray-client-server-port {port}" if parts.scheme == "ray"
                 else f"ray start --head --port {port}")
        raise ConfigError(f"--ray-address {address}: cannot reach {host}:{port} ({reason}); start the head there "
                          f"(`{start}`) or check the address") from None


class RayBackend:
    """Ray actors, one model each, on this machine (a private `ray.init()`, nothing to set up) or on a cluster
    (`--ray-address`). Each actor streams a file's messages back as a Ray generator; the parent stays the only
    writer.

    A lost actor (its process killed, out of memory, its node gone): the file it was running is reported lost,
    stays "running" in the ledger (its lines so far stay out of the finished record) and `--resume` runs it again,
    as for a lost local worker process. Ray restarts the actor (`max_restarts`: a new process, the model loaded
    again) and it goes on with the files still waiting. The lost file itself is not retried (`max_task_retries=0`,
    at-most-once): its first windows are already written, and a recording that crashes its worker (a decoder
    fault, memory) would crash the replacement too; one loss per file, and the ledger, keep a run moving."""

    def __init__(self, args: PipelineArgs, workers: int, address: str | None = None, cpus_per_worker: int = 1):
        try:
            import ray
        except ImportError:
            from edge.errors import ConfigError

            raise ConfigError(RAY_HINT) from None
        self.ray = ray
        if not ray.is_initialized():
            if address is None:
                # A private cluster of this machine's cores, gone with the process ("local": never a cluster that
                # `ray start` left running here). Its worker processes must import this package the way the driver
                # does (a source checkout on PYTHONPATH included).
                ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
            else:
                self._join(address)
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=RAY_MAX_RESTARTS, max_task_retries=0)(_RayWorker)
        self.actors = [actor.remote(args, i) for i in range(workers)]
        self.cpus_per_worker = cpus_per_worker
        self.args = args

    def _join(self, address: str) -> None:
        from edge.errors import ConfigError

        check_ray_address(address)
        try:
            self.ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # noqa: BLE001 (Ray raises ConnectionError, RuntimeError, AuthenticationError...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--ray-address {address}: could not join the Ray cluster there ({first}); a cluster "
                              "with token authentication (`ray start`'s default) needs RAY_AUTH_MODE=token and its "
                              "token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None

    def _where(self, i: int, actor) -> tuple[int, str]:
        """(pid, node address) of the actor, once Ray has placed it (a replacement after a loss included)."""
        ray = self.ray
        # Between losing an actor's process and marking it as restarting, Ray answers "unavailable" (it may come
        # back): ask again. ActorDiedError (no restarts left) goes to the caller.
        unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())  # Ray >= 2.2x; before, it waits
        t0 = time.monotonic()
        warn_at = t0 + RAY_PLACEMENT_WARN_S
        while True:
            ref = actor.where.remote()
            while not ray.wait([ref], timeout=1.0)[0]:
                if time.monotonic() > warn_at:
                    warn_at += RAY_PLACEMENT_WARN_S
                    logger.warning("Ray worker %d has not started after %.0f s: the cluster has no room for it yet "
                                   "(it asks for %d CPUs); the others go on", i, time.monotonic() - t0,
                                   self.cpus_per_worker)
            try:
                return ray.get(ref)
            except unavailable:
                time.sleep(0.2)

    def run(self, tasks):
        ray = self.ray
        out: queue.Queue = queue.Queue()
        tasks = list(tasks)
        todo = list(tasks)
        requeued: set[str] = set()
        lock = threading.Lock()

        def drive(i, actor):
            pid = None
            while True:
                try:
                    was, (pid, node) = pid, self._where(i, actor)
                except ray.exceptions.RayError as e:
                    # never up (its constructor failed, as it will for every worker) or out of restarts
                    out.put(("fatal" if pid is None else "gone", i, _ray_error_line(e)))
                    return
                if pid != was:
                    logger.info("Ray worker %d%s: pid %d on %s", i, "" if was is None else " restarted", pid, node)
                with lock:
                    if not todo:
                        break
                    task = todo.pop(0)
                logger.debug("Ray worker %d (pid %d on %s) runs %s", i, pid, node, task.source)
                received = False
                try:
                    for ref in actor.run_file.remote(task):
                        out.put(ray.get(ref))
                        received = True
                except ray.exceptions.RayTaskError as e:  # an exception inside run_file: the actor is fine
                    out.put(("end", i, task.path, _ray_error_line(e)))
                except ray.exceptions.RayError as e:  # the actor's process is gone (Ray's own log says why)
                    if not received and task.path not in requeued:
                        # lost before its first message: nothing of it was written; it goes back in the queue, once
                        # (a file that kills its worker before the first window is then reported lost)
                        logger.warning("Ray worker %d (pid %d on %s) was lost before it began %s (%s): the file goes "
                                       "back in the queue", i, pid, node, task.source, type(e).__name__)
                        with lock:
                            requeued.add(task.path)
                            todo.insert(0, task)
                        continue
                    out.put(("lost", i, task.path, pid, node, type(e).__name__))
                    # and around again: _where waits for Ray's replacement (max_restarts) or says it is gone
            out.put(("exit", i))

        threads = [threading.Thread(target=drive, args=(i, a), daemon=True, name=f"ray-worker-{i}")
                   for i, a in enumerate(self.actors)]
        for t in threads:
            t.start()
        alive, settled, total = len(threads), set(), len(todo)
        # Done when every file has ended or been lost: a worker the cluster never places must not hold the run.
        while alive and len(settled) < total:
            msg = out.get()
            kind = msg[0]
            if kind == "exit":
                alive -= 1
                continue
            if kind == "gone":
                alive -= 1
                logger.error("Ray worker %d is gone for good (%s); %d left", msg[1], msg[2], alive)
                continue
            if kind == "lost":
                logger.error("Ray worker %d (pid %d on %s) was lost while running %s (%s): that file stays "
                             "unfinished in the ledger and --resume runs it again; Ray replaces the worker for the "
                             "files still waiting", msg[1], msg[3], msg[4], msg[2], msg[5])
                settled.add(msg[2])
                yield msg[:3]
                continue
            if kind == "end":
                settled.add(msg[2])
            yield msg
        for t in tasks:  # every worker gone before these were taken
            if t.path not in settled:
                logger.error("%s was never run (every Ray worker was lost): --resume runs it", t.source)
                yield ("lost", -1, t.path)

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def _ray_error_line(e: BaseException) -> str:
    """One line of a Ray error: its cause's when it has one, the constructor's own error (the last line of Ray's
    traceback) for an actor that could not start, else Ray's first line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return _one_line(cause)
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[-1] if "creation task" in lines[0] else f"{type(e).__name__}: {lines[0]}"


class _RayWorker:
    def __init__(self, args: PipelineArgs, index: int):
        self.args = args
        self.index = index
        self.pipeline = args.open()

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    def run_file(self, task: FileTask):
        t0 = time.perf_counter()
        yield from process_file(self.pipeline, task, self.args.batch, self.args.with_embeddings, self.index)
        logger.debug("%s in %.1f s", task.path, time.perf_counter() - t0)
