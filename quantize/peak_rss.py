"""Peak resident memory of one command, measured in a child process that reports its own high-water mark.

Why not `getrusage(RUSAGE_CHILDREN)` or `wait4`'s rusage: Linux folds the pre-exec memory image's high-water mark
into `ru_maxrss` at exec, and Python's subprocess forks with vfork where it can, so the child's figure starts at the
*parent's* peak (a test runner with torch loaded, a benchmark holding models). `VmHWM` in /proc/self/status belongs
to the current memory image only, which exec replaced: read by the child itself at the end, it is the command's own
peak.

    python -m quantize.peak_rss REPORT.json cli quantize --naturelm ... (an `naturelm-edge` command line)
    python -m quantize.peak_rss REPORT.json quantize SRC.gguf DST.gguf Q4_K_M
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def measure(args: list[str], report: Path, log: Path | None = None, env: dict | None = None) -> dict:
    """Run `python -m quantize.peak_rss REPORT args...` and return {"rc", "peak_rss", "seconds"}."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    report = Path(report)
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log or os.devnull, "wb") as err:
        rc = subprocess.call([sys.executable, "-m", "quantize.peak_rss", str(report)] + list(args), env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
    seconds = time.perf_counter() - t0
    peak = json.loads(report.read_text())["peak_rss"] if report.is_file() else None
    return {"rc": rc, "peak_rss": peak, "seconds": seconds}


def main(argv: list[str]) -> int:
    report, mode, rest = Path(argv[0]), argv[1], argv[2:]
    if mode == "cli":
        from edge.cli import main as cli_main

        rc = cli_main(rest)
    elif mode == "quantize":
        from quantize.llama_quant import quantize_gguf

        quantize_gguf(Path(rest[0]), Path(rest[1]), rest[2])
        rc = 0
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    report.write_text(json.dumps({"rc": rc, "peak_rss": vm_hwm_bytes()}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
