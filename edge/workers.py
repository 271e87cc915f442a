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
    with_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    def open(self):
        from edge.pipeline import open_pipeline

        return open_pipeline(Path(self.bundle), list(self.prompts), device_id=self.device_id, provider=self.provider,
                             precision=self.precision, quantization=self.quantization, verify=self.verify,
                             gate_dbfs=self.gate_dbfs, n_gpu_layers=self.n_gpu_layers, threads=self.threads,
                             llm_threads=self.threads or None, max_batch=self.batch)


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


def _process_main(worker: int, args: PipelineArgs, tasks, results) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"naturelm-edge worker {worker}: %(message)s")
    try:
        pipeline = args.open()
    except Exception as e:  # noqa: BLE001 (reported to the parent, which stops the run with it)
        results.put(("fatal", worker, _one_line(e)))
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            for msg in process_file(pipeline, task, args.batch, args.with_embeddings, worker):
                results.put(msg)
    finally:
        pipeline.close()
        results.put(("exit", worker))


class ProcessBackend:
    """N processes (spawned: llama.cpp and onnxruntime hold threads that fork would copy half-alive), each with
    cores // N threads for onnxruntime and llama.cpp, taking files from one queue as they become free."""

    def __init__(self, args: PipelineArgs, workers: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.args = args
        self.workers = workers
        self.procs: list = []

    def run(self, tasks):
        tasks = list(tasks)
        tq, rq = self.ctx.Queue(), self.ctx.Queue()
        for t in tasks:
            tq.put(t)
        for _ in range(self.workers):
            tq.put(None)
        self.procs = [self.ctx.Process(target=_process_main, args=(i, self.args, tq, rq), daemon=True,
                                       name=f"naturelm-edge-worker-{i}") for i in range(self.workers)]
        for p in self.procs:
            p.start()
        alive = set(range(self.workers))
        current: dict[int, str] = {}
        ended: set[str] = set()
        while alive:
            try:
                msg = rq.get(timeout=1.0)
            except queue.Empty:
                for i in list(alive):
                    p = self.procs[i]
                    if not p.is_alive():
                        alive.discard(i)
                        lost = current.pop(i, None)
                        logger.error("worker %d (pid %s) exited with code %s%s", i, p.pid, p.exitcode,
                                     f" while running {lost}: its file is left unfinished in the ledger "
                                     "(--resume runs it again)" if lost else "")
                        if lost:
                            ended.add(lost)
                            yield ("lost", i, lost)
                continue
            kind, i = msg[0], msg[1]
            if kind == "exit":
                alive.discard(i)
                continue
            if kind == "start":
                current[i] = msg[2]
            elif kind == "end":
                current.pop(i, None)
                ended.add(msg[2])
            elif kind == "lost":
                ended.add(msg[2])
            yield msg
        # A worker that died between taking a file from the queue and saying so: that file was never run.
        for t in tasks:
            if t.path not in ended and t.path not in current.values():
                logger.error("%s was never run (its worker was lost): --resume runs it", t.source)
                yield ("lost", -1, t.path)

    def close(self):
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# --- Ray ---------------------------------------------------------------------------------------------------------


RAY_HINT = "--ray needs Ray: pip install 'naturelm-edge[ray]'"


class RayBackend:
    """Ray actors, one model each, on this machine (`ray.init()`, nothing to set up) or on a cluster
    (`--ray-address`). Each actor streams a file's messages back as a Ray generator; the parent stays the only
    writer. An actor that dies leaves its file unfinished in the ledger, as a local worker would."""

    def __init__(self, args: PipelineArgs, workers: int, address: str | None = None, cpus_per_worker: int = 1):
        try:
            import ray
        except ImportError:
            from edge.errors import ConfigError

            raise ConfigError(RAY_HINT) from None
        self.ray = ray
        if not ray.is_initialized():
            # Locally: a private cluster of this machine's cores, gone with the process. The worker processes must
            # import this package the way the driver does (a source checkout on PYTHONPATH included).
            env = {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}} if address is None else None
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                     configure_logging=False)
        actor = ray.remote(num_cpus=cpus_per_worker)(_RayWorker)
        self.actors = [actor.remote(args, i) for i in range(workers)]
        self.args = args

    def run(self, tasks):
        ray = self.ray
        out: queue.Queue = queue.Queue()
        todo = list(tasks)
        lock = threading.Lock()

        def drive(i, actor):
            while True:
                with lock:
                    if not todo:
                        break
                    task = todo.pop(0)
                try:
                    for ref in actor.run_file.remote(task):
                        out.put(ray.get(ref))
                except ray.exceptions.RayError as e:
                    out.put(("lost", i, task.path, str(e).splitlines()[0] if str(e) else type(e).__name__))
                    return
            out.put(("exit", i))

        threads = [threading.Thread(target=drive, args=(i, a), daemon=True) for i, a in enumerate(self.actors)]
        for t in threads:
            t.start()
        alive = len(threads)
        while alive:
            msg = out.get()
            if msg[0] == "exit":
                alive -= 1
                continue
            if msg[0] == "lost":
                alive -= 1
                logger.error("Ray worker %d was lost while running %s (%s): its file is left unfinished in the "
                             "ledger (--resume runs it again)", msg[1], msg[2], msg[3])
                yield msg[:3]
                continue
            yield msg

    def close(self):
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


class _RayWorker:
    def __init__(self, args: PipelineArgs, index: int):
        self.args = args
        self.index = index
        self.pipeline = args.open()

    def pid(self) -> int:
        return os.getpid()

    def run_file(self, task: FileTask):
        t0 = time.perf_counter()
        yield from process_file(self.pipeline, task, self.args.batch, self.args.with_embeddings, self.index)
        logger.debug("%s in %.1f s", task.path, time.perf_counter() - t0)
