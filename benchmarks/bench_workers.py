"""`infer` over a folder of recordings: one process against 2 local worker processes and 2 local Ray workers, on the
production-shaped `small` preset: windows per second, and the peak resident memory of every process involved.

Each configuration runs `naturelm-edge infer --out-dir` as a subprocess on the same folder (--files recordings of
--seconds each, edge.synth.birdsong, 16 kHz; hop = window = 10 s; a yes/no prompt and a 16-token caption):
- `one_process`: --workers 1 (onnxruntime and llama.cpp on all the usable cores);
- `processes_2`: --workers 2 (each worker: its own model, cores // 2 threads);
- `ray_2`: --ray --workers 2 (`ray.init()` on this machine: Ray's own processes plus 2 actors, cores // 2 threads
  each).
Memory: every 0.2 s the process tree of the run (the driver, its workers; for Ray also its GCS, raylet and worker
processes) is walked with psutil; per process its VmHWM (the kernel's own peak) is kept, and the largest sum of the
tree's RSS seen at one sample. The outputs of every configuration are compared with the one-process run's.

    PYTHONPATH=. flock /work/.bench.lock python benchmarks/bench_workers.py [--work DIR] [--files 4] [--seconds 30]

This machine is shared (2 vCPUs, other engineers' jobs): the JSON says so, with the load average around each run;
compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_pipeline import machine, prepare, save_report, usable_cpus

RESULTS = REPO / "benchmarks" / "results" / "workers.json"
CONFIGS = {"one_process": [], "processes_2": ["--workers", "2"], "ray_2": ["--ray", "--workers", "2"]}
PROMPTS = ("prompts:\n"
           "  - {id: sparrow, kind: yes_no, text: 'Is there a Song Sparrow in the audio? Answer Yes or No.'}\n"
           "  - {id: caption, kind: caption, text: Caption the audio., max_tokens: 16}\n")


def log(msg: str) -> None:
    print(f"[bench_workers] {msg}", file=sys.stderr, flush=True)


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(name: str, extra: list[str], bundle: Path, data: Path, prompts: Path, out: Path) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "edge.cli", "-q", "infer", "--no-progress", "--provider", "cpu", "--bundle",
           str(bundle), "--prompts", str(prompts), "--window", "10", "--hop", "10", "--out-dir", str(out),
           "--format", "jsonl", *extra, str(data)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peaks: dict[int, dict] = {}
    tree_peak = 0.0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0.0
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**20
                name_ = p.name()
                cmdline = " ".join(Path(c).name if c.startswith("/") else c for c in p.cmdline()[:4])[:100]
            except psutil.Error:
                continue
            total += rss
            hwm = _hwm_mb(p.pid)
            rec = peaks.setdefault(p.pid, {"name": name_, "cmd": cmdline, "peak_rss_mb": 0.0})
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], hwm or rss)
        tree_peak = max(tree_peak, total)
        time.sleep(0.2)
    err = proc.stderr.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    windows = len({(e["source"], e["window"]["index"]) for e in events})
    big = sorted((r for r in peaks.values() if r["peak_rss_mb"] >= 50), key=lambda r: -r["peak_rss_mb"])
    return {"command": " ".join(["naturelm-edge", *cmd[3:]]), "wall_seconds": round(wall, 2), "windows": windows,
            "windows_per_s": round(windows / wall, 4), "peak_tree_rss_mb": round(tree_peak, 1),
            "processes_over_50mb": [dict(r, peak_rss_mb=round(r["peak_rss_mb"], 1)) for r in big],
            "processes_seen": len(peaks), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "answers": {(e["source"], e["window"]["index"], e["prompt_id"]): (e["answer"], e["score"])
                        for e in events}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bundle", type=Path, help="another bundle instead of the small preset's (a quick check)")
    args = ap.parse_args(argv)

    import soundfile as sf

    from edge.synth import birdsong

    build = {} if args.bundle else prepare(args.work)
    bundle = args.bundle or args.work / "small-bundle"
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    data = tmp / "card"
    data.mkdir()
    for i in range(args.files):
        sf.write(str(data / f"rec{i:02d}.wav"), birdsong(args.seconds, 16000, seed=200 + i), 16000)
    prompts = tmp / "prompts.yaml"
    prompts.write_text(PROMPTS)
    results = {}
    try:
        for name in args.configs.split(","):
            log(f"{name}: {args.files} files x {args.seconds:g} s")
            results[name] = run(name, CONFIGS[name], bundle, data, prompts, tmp / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = results.get("one_process")
    for r in results.values():
        answers = r.pop("answers")
        if base is not None:
            r["speedup_vs_one_process"] = round(r["windows_per_s"] / base["windows_per_s"], 3)
            r["peak_tree_rss_ratio_vs_one_process"] = round(r["peak_tree_rss_mb"] / base["peak_tree_rss_mb"], 2)
            ref = base.get("_answers") or answers
            base["_answers"] = ref
            r["answers_identical_to_one_process"] = (answers.keys() == ref.keys()
                                                     and all(answers[k][0] == ref[k][0] for k in ref))
            r["max_score_difference"] = max((abs(answers[k][1] - ref[k][1]) for k in ref
                                             if k in answers and ref[k][1] is not None), default=0.0)
    if base is not None:
        base.pop("_answers", None)
    report = {
        "bundle": str(bundle),
        "what": "infer --out-dir over a folder, small preset (int8 encoder + Q4_K_M), yes/no + 16-token caption, "
                "hop = window = 10 s: one process vs 2 local worker processes vs 2 local Ray workers",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": dict(machine(usable_cpus()), shared="yes: a 2-vCPU build VM shared with other engineers' jobs "
                        "(see loadavg_before/after of each run); compare within this run"),
        "workload": {"files": args.files, "seconds_each": args.seconds, "prompts": PROMPTS},
        "build": {k: v for k, v in build.items() if k in ("built_utc", "build_command")},
        "results": results,
    }
    import ray

    report["machine"]["ray"] = ray.__version__
    save_report(args.out, report)
    print(f"{'config':12} {'wall s':>8} {'windows/s':>10} {'x one':>7} {'tree peak MB':>13} {'same answers':>13}")
    for name, r in results.items():
        print(f"{name:12} {r['wall_seconds']:8.1f} {r['windows_per_s']:10.3f} "
              f"{r.get('speedup_vs_one_process', 1):7.2f} {r['peak_tree_rss_mb']:13.0f} "
              f"{r.get('answers_identical_to_one_process', '-')!s:>13}")
        for p in r["processes_over_50mb"]:
            print(f"    {p['peak_rss_mb']:8.0f} MB  {p['name']}  {p['cmd']}")
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
