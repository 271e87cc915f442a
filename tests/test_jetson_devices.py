"""The GPU's DeviceAllow lines, generated from a board's own /proc/devices and /dev: on fixture trees of an Orin Nano,
an Orin NX and an AGX Orin under L4T 36 (tests/fixtures/jetson/*/dev.txt says what in them comes from where), and on a
real /dev tree of device nodes made here with mknod."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.jetson_devices import DROPIN_NAME, build, is_gpu_node, parse_listing, parse_proc_devices, plan, scan_dev

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((Path(__file__).parent / "fixtures" / "jetson").iterdir())
BOARDS = {f.name: f for f in FIXTURES}
# What CUDA, onnxruntime and llama.cpp open on an Orin under JetPack 6 (snapd's nvidia-tegra-drivers-support, the
# tinygrad AGX Orin report, WendyOS#1699, meta-tegra#2196; see the fixtures' headers).
MUST_OPEN = ["/dev/nvmap", "/dev/host1x-fence", "/dev/nvgpu/igpu0/ctrl", "/dev/nvgpu/igpu0/power",
             "/dev/nvgpu/igpu0/channel", "/dev/nvgpu/igpu0/as", "/dev/nvgpu/igpu0/tsg", "/dev/nvhost-ctrl-gpu",
             "/dev/nvhost-gpu", "/dev/nvhost-as-gpu", "/dev/nvhost-power-gpu", "/dev/nvhost-ctrl",
             "/dev/dri/renderD128", "/dev/nvidiactl", "/dev/nvidia0"]
MUST_STAY_SHUT = ["/dev/dri/card0", "/dev/fuse", "/dev/loop-control", "/dev/nvidia-modeset", "/dev/nvhost-vi",
                  "/dev/nvhost-isp", "/dev/snd/pcmC0D0c", "/dev/mem", "/dev/nvsciipc"]


def _load(board: Path):
    majors = parse_proc_devices((board / "proc" / "devices").read_text(), "proc/devices")
    nodes = parse_listing((board / "dev.txt").read_text(), "dev.txt")
    return majors, nodes


def _opened(allow: list[str], majors: dict, nodes) -> set[str]:
    """The nodes a set of DeviceAllow values opens, by systemd's rules: a path is that node; char-PATTERN is every
    major whose /proc/devices name matches PATTERN (fnmatch, as systemd does)."""
    opened = set()
    for line in allow:
        spec = line.split()[0]
        if spec.startswith("char-"):
            pat = spec[len("char-"):]
            ms = {m for m, names in majors.items() if any(fnmatch.fnmatchcase(n, pat) for n in names)}
            opened |= {n.path for n in nodes if n.major in ms}
        else:
            opened.add(spec)
    return opened


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_generated_lines_open_the_gpu_and_nothing_else(board):
    majors, nodes = _load(BOARDS[board])
    p = plan(nodes, majors)
    opened = _opened(p.allow, majors, nodes)
    missing = [n for n in MUST_OPEN if n not in opened]
    assert not missing, f"{board}: the GPU nodes {missing} stay shut"
    leaked = [n for n in MUST_STAY_SHUT if n in opened]
    assert not leaked, f"{board}: {leaked} opened too"
    assert opened == {n.path for n in nodes if is_gpu_node(n.path)}
    # nvgpu's two regions carry the platform device's name: one whole group, not 26 paths.
    assert "char-17000000.gpu rw" in p.allow and "char-host1x-fence rw" in p.allow
    # nvmap (misc) and the render nodes (drm) by path: their majors hold unrelated hardware.
    assert "/dev/nvmap rw" in p.allow and "/dev/dri/renderD128 rw" in p.allow and "char-drm rw" not in p.allow
    assert p.groups == ["render", "video"]


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_the_old_static_lines_open_nothing_of_the_gpu_on_l4t_36(board):
    """The regression the generator fixes: the units' former char-nvhost* / char-nvgpu* lines match no group name in
    an L4T 36 /proc/devices, so only the nodes named by path got through, and CUDA failed inside the sandbox."""
    majors, nodes = _load(BOARDS[board])
    old = ["char-nvhost* rw", "char-nvgpu* rw", "/dev/nvmap rw", "/dev/nvhost-ctrl rw", "/dev/nvhost-ctrl-gpu rw"]
    opened = _opened(old, majors, nodes)
    assert "/dev/nvgpu/igpu0/ctrl" not in opened and "/dev/dri/renderD128" not in opened
    assert "/dev/host1x-fence" not in opened


def test_fixtures_cover_the_three_orin_modules():
    names = " ".join(BOARDS)
    assert "orin-nano" in names and "orin-nx" in names and "agx-orin" in names
    for f in FIXTURES:
        assert "R36" in (f / "etc" / "nv_tegra_release").read_text()


def test_scan_of_a_real_dev_tree(tmp_path):
    """Real device nodes (mknod, as root) under a fake root: the scan stats them as it would on a board."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    board = BOARDS[min(BOARDS)]
    majors, nodes = _load(board)
    root = tmp_path / "board"
    for n in nodes:
        p = root / n.path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(p, 0o600 | 0o020000, os.makedev(n.major, n.minor))  # S_IFCHR
    (root / "dev" / "dri" / "by-path").mkdir()
    os.symlink("../renderD128", root / "dev" / "dri" / "by-path" / "platform-render")  # not followed
    (root / "proc").mkdir()
    shutil.copy(board / "proc" / "devices", root / "proc" / "devices")
    scanned = scan_dev(root)
    assert {(n.path, n.major, n.minor) for n in scanned} == {(n.path, n.major, n.minor) for n in nodes}
    p, source = build(root)
    want = plan(nodes, majors)
    assert p.allow == want.allow and str(root / "dev") in source


def test_cli_writes_the_dropin(tmp_path):
    board = BOARDS[min(BOARDS)]
    out1, out2 = tmp_path / "naturelm-edge.service.d", tmp_path / "naturelm-edge-engine.service.d"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "jetson-devices", "--root", str(board), "--listing",
                        str(board / "dev.txt"), "--write", str(out1), "--write", str(out2)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    text = (out1 / DROPIN_NAME).read_text()
    assert text == (out2 / DROPIN_NAME).read_text()
    assert "[Service]\n" in text and "DeviceAllow=char-17000000.gpu rw\n" in text
    assert "SupplementaryGroups=render video\n" in text


def test_cli_with_no_gpu_says_so(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "devices").write_text("Character devices:\n  1 mem\n 10 misc\n")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "jetson-devices", "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 1 and "no GPU device nodes" in r.stderr and r.stdout == ""


def test_bad_input_is_named(tmp_path):
    bad = tmp_path / "devices"
    bad.write_text("Character devices:\nabc mem\n")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "jetson-devices", "--root", str(tmp_path),
                        "--proc-devices", str(bad)], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 2
    assert re.search(rf"{re.escape(str(bad))}:2: not '<major> <name>'", r.stderr), r.stderr


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["naturelm-edge.service", "naturelm-edge-engine.service"])
def test_units_with_the_dropin_verify_and_stay_hardened(tmp_path, unit):
    """The unit as installed on an Orin (its text plus the generated drop-in's lines) passes `verify` and still
    scores at most 2.0 in `systemd-analyze security`."""
    board = BOARDS[min(BOARDS)]
    majors, nodes = _load(board)
    drop = [ln for ln in _dropin_lines(plan(nodes, majors)) if not ln.startswith(("#", "["))]
    stub = tmp_path / "naturelm-edge"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (ROOT / "systemd" / unit).read_text().replace("/opt/naturelm-edge/venv/bin/naturelm-edge", str(stub))
    head, sep, tail = text.partition("\n[Install]")
    merged = tmp_path / unit
    merged.write_text(head + "\n" + "\n".join(drop) + "\n" + sep + tail)
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(merged)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(merged)], capture_output=True, text=True,
                       timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m and float(m.group(1)) <= 2.0, r.stdout[-1500:]


def _dropin_lines(p) -> list[str]:
    from edge.jetson_devices import render_dropin

    return render_dropin(p, "test").splitlines()
