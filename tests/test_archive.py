"""`naturelm-edge infer` over an archive: a folder tree in, results streamed to --out-dir, a ledger for --resume,
failed windows isolated, memory flat in the number of windows, several workers (processes and Ray) with outputs
identical to one process. Tiny preset, real onnxruntime and llama.cpp, real SQLite, the CLI as a subprocess."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.synth import birdsong

PROMPTS = (
    "prompts:\n"
    "  - {id: bird, kind: yes_no, text: 'Is there a bird in the audio? Answer Yes or No.', threshold: 0.5}\n"
    "  - {id: caption, kind: caption, text: Caption the audio., max_tokens: 4, every_n_windows: 3}\n"
)


def _write(path: Path, seconds: float, sr: int = 16000, seed: int = 0, subtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), birdsong(seconds, sr, seed=seed), sr, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """card/siteA/2026-06-01/{a.wav,b.flac}, card/siteB/{c.wav,skip_me.wav,notes.txt}."""
    root = tmp_path_factory.mktemp("card") / "card"
    _write(root / "siteA" / "2026-06-01" / "a.wav", 32.0, seed=1)
    _write(root / "siteA" / "2026-06-01" / "b.flac", 17.0, 22050, seed=2)
    _write(root / "siteB" / "c.wav", 41.0, seed=3)
    _write(root / "siteB" / "skip_me.wav", 12.0, seed=4)
    (root / "siteB" / "notes.txt").write_text("field notes, not audio\n")
    prompts = root.parent / "prompts.yaml"
    prompts.write_text(PROMPTS)
    return root


def _infer(bundle, *args, check=True, env=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "edge.cli", "infer", "--no-progress", "--provider", "cpu",
                        "--bundle", str(bundle), "--hop", "5", *map(str, args)],
                       capture_output=True, text=True, timeout=600, check=False, env=env, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _answers(events: list[dict]) -> dict:
    """What a run answered, independent of timing and arrival order: (source, window, prompt) -> answer."""
    out = {}
    for e in events:
        key = (e["source"], e["window"]["index"], e["prompt_id"])
        assert key not in out, f"duplicate {key}"
        out[key] = (e["event_id"], e["answer"], e["score"], e.get("positive"), e["window"]["offset_s"],
                    e["window"]["duration_s"])
    return out


def _ledger(out: Path) -> dict:
    with sqlite3.connect(out / "ledger.sqlite") as db:
        return {Path(p).name: (s, w, wf, n) for p, s, w, wf, n in
                db.execute("select path, status, windows, windows_failed, events from files")}


def _csv(out: Path) -> list[dict]:
    with open(out / "events.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tiny_full_bundle, tree, tmp_path_factory):
    """One uninterrupted single-process run of the tree: what every other run must equal."""
    out = tmp_path_factory.mktemp("ref") / "out"
    _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*",
           tree)
    return out


def test_directory_tree_with_filters_streams_every_output(reference, tree):
    events = _events(reference)
    sources = {Path(e["source"]).relative_to(tree).as_posix() for e in events}
    assert sources == {"siteA/2026-06-01/a.wav", "siteA/2026-06-01/b.flac", "siteB/c.wav"}  # notes.txt, skip_me out
    answers = _answers(events)
    windows = {s: sorted({k[1] for k in answers if k[0].endswith(s)}) for s in ("a.wav", "b.flac", "c.wav")}
    assert windows == {"a.wav": list(range(6)), "b.flac": list(range(3)), "c.wav": list(range(8))}
    assert [e["seq"] for e in events] == list(range(len(events)))
    rows = _csv(reference)
    assert [(r["source"], int(r["window_index"]), r["prompt_id"]) for r in rows] == \
        [(e["source"], e["window"]["index"], e["prompt_id"]) for e in events]
    for rel in ("siteA/2026-06-01/a.wav", "siteA/2026-06-01/b.flac", "siteB/c.wav"):
        table = reference / "raven" / f"{rel}.selections.txt"
        assert table.read_text().startswith("Selection\tView\tChannel\t")
    ledger = _ledger(reference)
    assert ledger == {"a.wav": ("done", 6, 0, 8), "b.flac": ("done", 3, 0, 4), "c.wav": ("done", 8, 0, 11)}


def test_include_takes_only_matches(tiny_full_bundle, tree, tmp_path):
    out = tmp_path / "out"
    _infer(tiny_full_bundle, "--prompt", "Is there a bird? Answer Yes or No.", "--out-dir", out, "--format", "jsonl",
           "--include", "siteA/*", "--include", "*.flac", tree)
    assert {Path(e["source"]).name for e in _events(out)} == {"a.wav", "b.flac"}


def test_killed_mid_run_then_resume_loses_and_duplicates_nothing(tiny_full_bundle, tree, reference, tmp_path):
    """SIGKILL the run while a file is half done (one file finished before it), then --resume: the outputs equal the
    uninterrupted run's, record for record, and the finished file is not run again."""
    out = tmp_path / "out"
    args = ["--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*", tree]
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "infer", "--no-progress", "--provider", "cpu",
                             "--bundle", str(tiny_full_bundle), "--hop", "5", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    killed_during = None
    while time.monotonic() < deadline and proc.poll() is None:
        ledger = out / "ledger.sqlite"
        if ledger.exists():
            try:
                state = _ledger(out)
            except sqlite3.OperationalError:
                state = {}
            done = [n for n, s in state.items() if s[0] == "done"]
            running = [n for n, s in state.items() if s[0] == "running"]
            jsonl = out / "events.jsonl"
            # mid-file: the second file has begun writing lines
            if done and running and jsonl.exists() and any(
                    running[0] in line for line in jsonl.read_text().splitlines()):
                proc.send_signal(signal.SIGKILL)
                killed_during = running[0]
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_during is not None, f"the run ended before it could be killed mid-file: {proc.stderr.read()}"
    partial = _events(out) if (out / "events.jsonl").exists() else []
    assert any(killed_during in e["source"] for e in partial)

    r = _infer(tiny_full_bundle, *args, "--resume")
    assert "already done" in r.stderr
    resumed = _events(out)
    assert _answers(resumed) == _answers(_events(reference))
    seqs = [e["seq"] for e in resumed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # a seq never goes backwards
    assert sorted((r["source"], r["window_index"], r["prompt_id"], r["answer"]) for r in _csv(out)) == \
        sorted((r["source"], r["window_index"], r["prompt_id"], r["answer"]) for r in _csv(reference))
    for table in (reference / "raven").rglob("*.selections.txt"):
        assert (out / "raven" / table.relative_to(reference / "raven")).read_text() == table.read_text()
    assert _ledger(out) == _ledger(reference)

    again = _infer(tiny_full_bundle, *args, "--resume")  # everything done: nothing runs, nothing is added
    assert again.returncode == 0
    assert _events(out) == resumed


def test_changed_prompts_or_file_run_again(tiny_full_bundle, tree, reference, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    src = tmp_path / "card"
    shutil.copytree(tree, src)
    # the copied tree has other paths: a different identity, so everything runs; then a touched file alone reruns
    args = ["--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*", src]
    _infer(tiny_full_bundle, *args, "--resume")
    before = _events(out)
    os.utime(src / "siteB" / "c.wav", ns=(time.time_ns(), time.time_ns()))
    r = _infer(tiny_full_bundle, *args, "--resume")
    assert "2 of 3 recordings are already done" in r.stderr
    after = _events(out)
    assert {k for k in _answers(after)} == {k for k in _answers(before)}  # c.wav's old lines replaced, not doubled
    changed = tmp_path / "other.yaml"
    changed.write_text("prompts:\n  - {id: frog, kind: yes_no, text: 'Is there a frog? Answer Yes or No.'}\n")
    _infer(tiny_full_bundle, "--prompts", changed, "--out-dir", out, "--exclude", "*skip_*", src, "--resume")
    src_events = [e for e in _events(out) if e["source"].startswith(str(src))]
    assert {e["prompt_id"] for e in src_events} == {"frog"}  # every file ran again under the new prompt list
    assert len(src_events) == 6 + 3 + 8


def test_a_failing_window_is_recorded_and_the_file_goes_on(tiny_full_bundle, tmp_path):
    sr = 16000
    x = birdsong(40.0, sr, seed=5).astype(np.float32)
    x[15 * sr: 35 * sr] = np.nan  # windows at 15, 20 and 25 s hold no finite sample
    rec = tmp_path / "rec"
    rec.mkdir()
    sf.write(str(rec / "nan.wav"), x, sr, subtype="FLOAT")
    out = tmp_path / "out"
    r = _infer(tiny_full_bundle, "--prompt", "Is there a bird? Answer Yes or No.", "--out-dir", out, rec,
               check=False)
    assert r.returncode == 1
    assert "3 windows failed" in r.stderr and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "window 3 at 15.0 s failed" in line]
    assert sorted(e["window"]["index"] for e in _events(out)) == [0, 1, 2, 6]
    with sqlite3.connect(out / "ledger.sqlite") as db:
        assert [i for (i,) in db.execute("select window_index from window_errors order by 1")] == [3, 4, 5]
        assert db.execute("select status, windows, windows_failed from files").fetchall() == [("done", 4, 3)]


def test_memory_stays_flat_in_the_number_of_windows(tiny_full_bundle, tmp_path):
    """Python-allocated memory (tracemalloc) of the window loop (read, window, model, JSONL, CSV, ledger) over a
    5-window file and then a 30-window file, three prompts, the model opened beforehand: events are written, not
    held. (A Raven table is the one output that holds anything: the merged selections of the file in progress, to
    write them sorted when it ends.)"""
    import argparse
    import gc
    import tracemalloc

    from edge.infer import Recording, Writer
    from edge.ledger import Ledger
    from edge.prompts import load_prompts
    from edge.workers import FileTask, InlineBackend, PipelineArgs

    prompts = tmp_path / "p.yaml"
    prompts.write_text("prompts:\n" + "".join(
        f"  - {{id: q{i}, kind: yes_no, text: 'Is there a {a}? Answer Yes or No.'}}\n"
        for i, a in enumerate(("bird", "frog", "bat"))))
    specs = load_prompts(prompts)
    backend = InlineBackend(PipelineArgs(bundle=str(tiny_full_bundle), prompts=tuple(specs), device_id="t"))
    out = tmp_path / "out"
    out.mkdir()
    ledger = Ledger(out / "ledger.sqlite", "b", "h")
    args = argparse.Namespace(out_dir=str(out), out=None, embeddings=None, plot=None)
    writer = Writer(args, ["jsonl", "csv"], "h", ledger=ledger)
    mem = {}
    tracemalloc.start()
    try:
        for seconds in (50, 300):
            f = _write(tmp_path / f"long{seconds}.wav", seconds, 8000, seed=6)
            writer.add_recording(Recording(f, str(f), f.name))
            gc.collect()  # ctypes casts (the logits view) make reference cycles: garbage, not kept memory
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for msg in backend.run([FileTask(str(f), str(f), 10.0, 10.0)]):
                writer.handle(msg)
            gc.collect()
            now, peak = tracemalloc.get_traced_memory()
            mem[seconds] = {"kept": now - before, "peak": peak - before}
    finally:
        tracemalloc.stop()
        writer.close()
        backend.close()
        ledger.close()
    assert len(_events(out)) == 3 * (5 + 30)  # every window answered
    # The first file warms caches (tokenised prompts...); the 30-window file after it keeps nothing: holding its 90
    # events would keep > 110 KB. Its peak is one window's working set, no larger than the 5-window file's.
    assert mem[300]["kept"] < 60_000, mem
    assert mem[300]["peak"] < mem[50]["peak"] + 50_000, mem


def test_parquet_partitions_by_source_and_date(tiny_full_bundle, tree, tmp_path):
    ds = pytest.importorskip("pyarrow.dataset", reason="Parquet output needs the `archive` extra (pyarrow)")
    out = tmp_path / "out"
    _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*",
           "--format", "jsonl,parquet", tree)
    table = ds.dataset(out / "parquet", partitioning="hive").to_table().to_pylist()
    events = _events(out)
    assert len(table) == len(events)
    by_id = {e["event_id"]: e for e in events}
    for row in table:
        e = by_id[row["event_id"]]
        assert row["source"] == Path(e["source"]).relative_to(tree).as_posix()
        assert str(row["date"]) == e["window"]["start"][:10]
        assert (row["window_index"], row["prompt_id"], row["answer"], row["score"]) == \
            (e["window"]["index"], e["prompt_id"], str(e["answer"]), e["score"])


def test_batched_run_gives_the_same_answers(tiny_full_bundle, tree, reference, tmp_path):
    """--batch 4: the windows go through the pipeline four at a time; the answers are bit for bit those of --batch 1.
    --shared-batches: decisions identical, scores within 1e-2 (tests/test_batch.py gives the bounds), and a run of its
    own for --resume (its prompt-list hash differs)."""
    out = tmp_path / "out"
    r = _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude",
               "*skip_*", "--batch", "4", tree)
    assert "one by one" not in r.stderr  # the batches ran as batches
    assert _answers(_events(out)) == _answers(_events(reference))
    assert _ledger(out) == _ledger(reference)
    shared = tmp_path / "shared"
    _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", shared, "--exclude",
           "*skip_*", "--batch", "4", "--shared-batches", tree)
    got, want = _answers(_events(shared)), _answers(_events(reference))
    assert got.keys() == want.keys()
    for k in want:
        if k[2] == "bird":  # decisions; a caption may differ at a near-tie
            assert (got[k][1], got[k][3]) == (want[k][1], want[k][3]), k
            assert got[k][2] == pytest.approx(want[k][2], abs=1e-2), k


def test_two_worker_processes_give_the_same_outputs(tiny_full_bundle, tree, reference, tmp_path):
    out = tmp_path / "out"
    _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*",
           "--workers", "2", tree)
    got, want = _answers(_events(out)), _answers(_events(reference))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][:2] == want[k][:2] and got[k][3:] == want[k][3:], k
        if want[k][2] is not None:
            assert got[k][2] == pytest.approx(want[k][2], abs=1e-5), k
    for table in (reference / "raven").rglob("*.selections.txt"):
        assert (out / "raven" / table.relative_to(reference / "raven")).read_text() == table.read_text()


def test_ray_two_local_workers_give_the_same_outputs(tiny_full_bundle, tree, reference, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'naturelm-edge[ray]'); not installed")
    out = tmp_path / "out"
    _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*",
           "--workers", "2", "--ray", tree)
    got, want = _answers(_events(out)), _answers(_events(reference))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][:2] == want[k][:2] and got[k][3:] == want[k][3:], k
    assert _ledger(out) == _ledger(reference)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _open_recordings(pid: int, root: Path) -> list[str]:
    found = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(root)) and target.endswith((".wav", ".flac")):
                found.append(target)
    except OSError:  # the process ended meanwhile
        pass
    return found


def test_a_worker_killed_mid_run_loses_nothing(tiny_full_bundle, tree, reference, tmp_path):
    """--workers 2, one worker process SIGKILLed while it runs a file: the run finishes the other files, says which
    file was cut short and exits 1; --resume then gives the uninterrupted run's outputs exactly."""
    out = tmp_path / "out"
    args = ["--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*", tree]
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "infer", "--no-progress", "--provider", "cpu",
                             "--bundle", str(tiny_full_bundle), "--hop", "5", "--workers", "2", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        # A worker reads a recording in blocks (edge/audio_io.py): while the file is open it is in flight. Killing
        # a worker only once it has a file open and the run has written events makes the kill land mid-file (a
        # worker killed between files loses nothing and the run rightly exits 0).
        jsonl = out / "events.jsonl"
        if jsonl.exists() and jsonl.stat().st_size > 0:
            for c in _children(proc.pid):
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes() and _open_recordings(c, tree):
                    victim = c
                    os.kill(victim, signal.SIGKILL)
                    break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    assert victim is not None, f"the run ended before a worker could be killed: {err}"
    assert proc.returncode == 1, err
    assert "cut short by a lost worker" in err and "--resume" in err and "Traceback" not in err
    _infer(tiny_full_bundle, *args, "--resume")
    assert _answers(_events(out)) == _answers(_events(reference))
    assert _ledger(out) == _ledger(reference)


def test_one_progress_bar_over_the_archive_with_rate_and_eta(tiny_full_bundle, tree, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "infer", "--provider", "cpu", "--bundle",
                        str(tiny_full_bundle), "--hop", "5", "--prompt", "Is there a bird? Answer Yes or No.",
                        "--out-dir", str(tmp_path / "out"), "--exclude", "*skip_*", str(tree)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    bars = {line.split(":")[0] for line in r.stderr.replace("\r", "\n").splitlines() if "win/s" in line}
    assert bars == {"infer"}  # one bar for the whole tree, not one per file
    final = [line for line in r.stderr.replace("\r", "\n").splitlines() if "17/17" in line]
    assert final and "100%" in final[-1] and "<" in final[-1]  # elapsed<remaining: tqdm's ETA field


def test_two_runs_into_one_folder_are_refused(tiny_full_bundle, tree, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / "ledger.sqlite.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running infer holds it
        r = _infer(tiny_full_bundle, "--prompt", "Is there a bird? Answer Yes or No.", "--out-dir", out, tree,
                   check=False)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("naturelm-edge: error:")]
    assert len(errors) == 1 and "another `infer` is writing there" in errors[0] and str(out) in errors[0]
    assert not (out / "events.jsonl").exists()


class _Lines:
    """A subprocess's stderr, read line by line as it comes (a thread), kept for the test to search."""

    def __init__(self, stream):
        import threading

        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        self._t.join(timeout=30)
        return "\n".join(self.lines)


@pytest.mark.parametrize("workers", [2, 1])
def test_a_ray_worker_lost_mid_run_loses_nothing(tiny_full_bundle, tree, reference, tmp_path, workers):
    """--ray, one Ray actor's process SIGKILLed while its file is half written: the run does not hang, names that
    file on one line, leaves it unfinished in the ledger, finishes the other files and exits 1; --resume then gives
    the uninterrupted single-process run's outputs, record for record. With 2 workers the other files finish on the
    survivor or on Ray's replacement; with 1 worker (killed on a.wav, the first file) only the replacement can run
    them. The actor and its file are found from the run's own debug log ("Ray worker N (pid P on HOST) runs FILE"),
    the moment from the outputs: the kill lands after the file's first window is written and long before its last
    (a.wav has 6 windows, c.wav 8)."""
    import re

    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'naturelm-edge[ray]'); not installed")
    out = tmp_path / "out"
    args = ["--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude", "*skip_*", tree]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "-v", "infer", "--no-progress", "--provider", "cpu",
                             "--bundle", str(tiny_full_bundle), "--hop", "5", "--workers", str(workers), "--ray",
                             *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _Lines(proc.stderr)
    runs = re.compile(r"Ray worker (\d+) \(pid (\d+) on \S+\) runs (\S+)$")
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        jsonl = out / "events.jsonl"
        written = [json.loads(line)["source"] for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
        for m in filter(None, map(runs.search, list(err.lines))):
            source = m.group(3)
            lines = sum(s == source for s in written)  # window 0: bird and caption; window 1: bird
            if Path(source).name in ("a.wav", "c.wav") and 1 <= lines <= 3:
                victim = (int(m.group(2)), source)
                os.kill(victim[0], signal.SIGKILL)
                break
        time.sleep(0.02)
    try:
        proc.wait(timeout=240)  # the run must end by itself: a lost actor never hangs it
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.text()
    assert victim is not None, f"no Ray worker could be caught mid-file: {text[-3000:]}"
    pid, lost = victim
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    summary = [line for line in text.splitlines() if "cut short by a lost worker" in line]
    assert len(summary) == 1 and f"({lost})" in summary[0] and "--resume" in summary[0], summary
    assert [line for line in text.splitlines() if f"(pid {pid} on" in line and f"was lost while running {lost}" in
            line]
    ledger = _ledger(out)
    want = _ledger(reference)
    name = Path(lost).name
    assert ledger[name][0] == "running"  # not done: --resume runs it again
    assert {n: s for n, s in ledger.items() if n != name} == {n: s for n, s in want.items() if n != name}
    restarted = [line for line in text.splitlines() if re.search(r"Ray worker \d+ restarted: pid \d+", line)]
    if workers == 1:
        assert restarted, text[-3000:]  # b.flac and c.wav ran on the replacement
    print(f"killed pid {pid} on {name}; the run ended {time.monotonic() - t0:.1f} s after it started; {restarted}")

    r = _infer(tiny_full_bundle, *args, "--resume")
    assert "2 of 3 recordings are already done" in r.stderr
    resumed = _events(out)
    assert _answers(resumed) == _answers(_events(reference))  # no loss, no duplicate (_answers asserts that)
    seqs = [e["seq"] for e in resumed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert sorted((r["source"], r["window_index"], r["prompt_id"], r["answer"]) for r in _csv(out)) == \
        sorted((r["source"], r["window_index"], r["prompt_id"], r["answer"]) for r in _csv(reference))
    for table in (reference / "raven").rglob("*.selections.txt"):
        assert (out / "raven" / table.relative_to(reference / "raven")).read_text() == table.read_text()
    assert _ledger(out) == want


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray cluster of one head node (2 CPUs), started with the `ray` CLI as an operator would, with token
    authentication (Ray's default) and a token of its own. It runs with --block in its own process group, so it is
    stopped by signalling that group: never `ray stop`, which stops every Ray process of this user on the machine
    (other runs' clusters included)."""
    import secrets
    import shutil
    import socket
    import tempfile

    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'naturelm-edge[ray]'); not installed")
    cli = Path(sys.executable).parent / "ray"
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = open(temp / "head.log", "w")  # noqa: SIM115 (closed below, after the head)
    head = subprocess.Popen([str(cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (temp / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        yield f"127.0.0.1:{port}", env, temp
    finally:
        head.send_signal(signal.SIGTERM)  # --block: Ray stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its group still there
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_joins_a_running_cluster(tiny_full_bundle, tree, reference, ray_head, tmp_path):
    """`ray start --head`, then `infer --ray-address HOST:PORT --workers 2` with the cluster's token: the actors run
    on that cluster (their logs are in its session folder) and the outputs equal one process's. Without the token:
    one line naming the address and what to set."""
    import re

    address, env, temp = ray_head
    out = tmp_path / "out"
    r = _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", out, "--exclude",
               "*skip_*", "--workers", "2", "--ray-address", address, tree, env=env)
    pids = [int(m.group(1)) for m in re.finditer(r"Ray worker \d: pid (\d+) on ", r.stderr)]
    assert len(pids) == 2, r.stderr
    for pid in pids:  # the actors were that cluster's worker processes: their logs are in its session folder
        assert list(temp.rglob(f"python-core-worker-*_{pid}.log")), (pid, r.stderr)
    got, want = _answers(_events(out)), _answers(_events(reference))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][:2] == want[k][:2] and got[k][3:] == want[k][3:], k
    assert _ledger(out) == _ledger(reference)

    # Without the cluster's token: Ray gives up after its own retries (~20 s); one line says what to set.
    plain = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    r = _infer(tiny_full_bundle, "--prompts", tree.parent / "prompts.yaml", "--out-dir", tmp_path / "out2",
               "--exclude", "*skip_*", "--workers", "2", "--ray-address", address, tree, env=plain, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("naturelm-edge: error:")]
    assert len(errors) == 1 and f"--ray-address {address}: could not join" in errors[0], r.stderr[-3000:]
    assert "RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_wrong_ray_address_is_one_line_and_quick(tiny_full_bundle, tree, tmp_path, scheme):
    """Nothing listens at the address: one line naming it, at once (Ray alone retries for a minute or more). A
    ray:// address (Ray Client) without Ray Client's dependency says so first."""
    import importlib.util

    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'naturelm-edge[ray]'); not installed")
    address = f"{scheme}127.0.0.1:{_free_port()}"
    problem = "needs pip install 'ray[client]'" if scheme and importlib.util.find_spec("grpc") is None \
        else "cannot reach"
    t0 = time.monotonic()
    r = _infer(tiny_full_bundle, "--prompt", "Is there a bird? Answer Yes or No.", "--out-dir", tmp_path / "out",
               "--ray-address", address, tree, check=False)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("naturelm-edge: error:")]
    assert len(errors) == 1 and f"--ray-address {address}: " in errors[0] and problem in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 30, elapsed  # the CLI's own start-up, no waiting on Ray


def test_an_unforeseen_error_fails_its_file_loudly_in_any_worker(tiny_full_bundle, tmp_path):
    """An error no code path expected (here: a window length of 0 reaching the reader, a ValueError) ends its file
    with that error, in the process and in a worker process alike: the file counts as failed, the next file runs,
    and nothing is left neither done nor failed."""
    from edge.prompts import parse_prompts
    from edge.workers import FileTask, InlineBackend, PipelineArgs, ProcessBackend

    good = _write(tmp_path / "good.wav", 12.0, seed=5)
    tasks = [FileTask(str(good), "bad.wav", 0.0, 5.0), FileTask(str(good), "good.wav", 10.0, 5.0)]
    args = PipelineArgs(bundle=str(tiny_full_bundle), prompts=tuple(parse_prompts(
        [{"id": "bird", "kind": "yes_no", "text": "Is there a bird?"}], "t")), device_id="t", verify="size")
    for backend in (InlineBackend(args), ProcessBackend(args, 1)):
        try:
            msgs = list(backend.run(tasks))
        finally:
            backend.close()
        ends = [m for m in msgs if m[0] == "end"]
        assert len(ends) == 2 and not [m for m in msgs if m[0] == "lost"], msgs
        assert ends[0][3].startswith("unexpected error: ValueError: window and hop must be positive"), ends[0]
        assert ends[1][3] is None
        assert sum(m[0] == "window" for m in msgs) == 2  # the good file's windows
