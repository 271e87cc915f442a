"""The device package never imports torch or transformers (JetPack images ship neither; torch alone costs ~1 GB of
RAM). Every module under edge/ is imported in a fresh interpreter, then the CLI's parser is built (it imports every
subcommand module), and the first one that pulls either in is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib, json, pkgutil, sys
import edge
heavy = ("torch", "transformers")
report = {"edge": [m for m in heavy if m in sys.modules], "modules": [], "culprits": {}}
for info in sorted(pkgutil.walk_packages(edge.__path__, prefix="edge."), key=lambda i: i.name):
    importlib.import_module(info.name)
    report["modules"].append(info.name)
    for m in heavy:
        if m in sys.modules and m not in report["culprits"]:
            report["culprits"][m] = info.name
# The device runs the `naturelm-edge` CLI, whose parser imports every subcommand module, workstation ones included.
import edge.cli
edge.cli.build_parser()
for m in heavy:
    if m in sys.modules and m not in report["culprits"]:
        report["culprits"][m] = "edge.cli.build_parser() (a subcommand module imports it at module level)"
print(json.dumps(report))
"""


def test_edge_never_imports_torch_or_transformers():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(REPO), check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["edge"] == [], "import edge pulled in " + ", ".join(report["edge"])
    assert report["culprits"] == {}, "first imported by: " + json.dumps(report["culprits"])
    # the walk really covered the package, this module's own subject included
    expected = {f"edge.{p.stem}" for p in (REPO / "edge").glob("*.py") if p.stem != "__init__"}
    assert expected <= set(report["modules"])
