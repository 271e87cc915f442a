"""The GPU's device nodes, as this board has them, turned into the systemd lines that let the hardened unit open them.

The units run with `DevicePolicy=closed`: a device is reachable only if a `DeviceAllow=` line names it. Such a line
names a device either by path (systemd stats it when the unit starts) or as `char-<name>`, which systemd matches
against the *group names in /proc/devices*, not against file names. That is where a fixed list goes wrong on a
Jetson: on L4T 36 the nvgpu driver registers its character devices under the GPU's platform device name
(`alloc_chrdev_region(..., dev_name(dev))` in nvgpu's os/linux/ioctl.c: `17000000.gpu` on Orin), so `char-nvgpu*` or
`char-nvhost*` match nothing, and `/dev/nvhost-*-gpu` and `/dev/nvgpu/igpu0/*` stay shut. CUDA on JetPack 6 also
opens `/dev/host1x-fence`, `/dev/nvmap` and a DRM render node (`/dev/dri/renderD*`, group `render`).

So the lines are read off the board: every GPU node under /dev is stat'ed, its major looked up in /proc/devices, and

- a major whose every node under /dev is the GPU's becomes one `char-<name>` line (it covers nodes the driver creates
  later, such as more nvgpu channels);
- a major shared with other hardware (`misc` for /dev/nvmap, `drm` for the display's /dev/dri/card*, a host1x
  region shared with camera engines) is opened node by node, by path, so the sandbox stays closed to the rest;
- the groups that own those nodes (`video`, `render`) go into `SupplementaryGroups=`.

`naturelm-edge jetson-devices` prints the drop-in; scripts/install-jetson.sh writes it to
/etc/systemd/system/naturelm-edge.service.d/ (and the engine unit's). `--listing` reads a saved listing instead of
/dev (made on a board with `find /dev -type c -exec stat -c '%n %t %T %U %G %a' {} +`), which is how the tests run
the Orin Nano, NX and AGX trees on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import fnmatch
import grp
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from edge.errors import NatureLMEdgeError

#: Device nodes (relative to /dev) that the CUDA driver, onnxruntime's CUDA/TensorRT providers and llama.cpp's CUDA
#: backend open on a Jetson, or on a machine with a discrete NVIDIA GPU. Sources: nvgpu's os/linux/ioctl.c (the
#: legacy /dev/nvhost-*-gpu names and the /dev/nvgpu/igpu0/* hierarchy), snapd's nvidia-tegra-drivers-support
#: interface (nvmap, host1x-fence, nvgpu/igpu0/{power,ctrl,...}, dri/renderD*), OE4T/meta-tegra#2196 (nvhost-ctrl:
#: without it CUDA synchronises by polling), wendylabsinc/WendyOS#1699 (no render node: cuInit fails with 801).
GPU_NODES = (
    "nvhost-gpu", "nvhost-*-gpu", "nvhost-ctrl",
    "nvgpu/igpu*/*", "nvgpu/igpu*/*/*",
    "nvmap", "host1x-fence",
    "dri/renderD*",
    "nvidiactl", "nvidia[0-9]*", "nvidia-uvm", "nvidia-uvm-tools",
)
#: /proc/devices groups that are never opened whole: they hold unrelated hardware by design.
SHARED_GROUPS = frozenset({"mem", "misc", "tty", "ttyS", "pty", "drm", "input", "sound", "alsa", "usb", "usb_device",
                           "vcs", "vc", "ptm", "pts", "fb", "hidraw", "bsg", "rtc", "watchdog", "mmc", "sg", "i2c",
                           "spi", "gpiochip", "media", "video4linux", "v4l", "dma_heap", "tpm"})
DROPIN_NAME = "50-gpu-devices.conf"


class DeviceScanError(NatureLMEdgeError):
    """/proc/devices or the /dev listing cannot be read or parsed."""


@dataclass(frozen=True)
class Node:
    path: str  # "/dev/nvmap"
    major: int
    minor: int
    group: str  # owning group, as a name where one is known


@dataclass
class Plan:
    allow: list[str]  # the DeviceAllow= values, e.g. "char-17000000.gpu rw", "/dev/nvmap rw"
    groups: list[str]  # for SupplementaryGroups=
    gpu_nodes: list[Node]
    notes: list[str]  # why each line is what it is, for the drop-in's comments


def parse_proc_devices(text: str, origin: str = "/proc/devices") -> dict[int, list[str]]:
    """The character-device section of /proc/devices: major -> names (a name may hold several majors, and on a
    Jetson does: nvgpu registers its power node and its user nodes as two regions of the same name)."""
    majors: dict[int, list[str]] = {}
    section = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.endswith(":"):
            section = s[:-1].strip().lower()
            continue
        if section != "character devices":
            continue
        parts = s.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DeviceScanError(f"{origin}:{n}: not '<major> <name>': {line!r}")
        majors.setdefault(int(parts[0]), []).append(parts[1].strip())
    if not majors:
        raise DeviceScanError(f"{origin}: no 'Character devices:' section")
    return majors


def parse_listing(text: str, origin: str) -> list[Node]:
    """Lines of `stat -c '%n %t %T %U %G %a'` (path, major and minor in hex, owner, group, mode)."""
    nodes = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) != 6:
            raise DeviceScanError(f"{origin}:{n}: expected 'PATH MAJOR_HEX MINOR_HEX OWNER GROUP MODE': {line!r}")
        try:
            major, minor = int(parts[1], 16), int(parts[2], 16)
        except ValueError:
            raise DeviceScanError(f"{origin}:{n}: major/minor are not hexadecimal: {line!r}") from None
        nodes.append(Node(parts[0], major, minor, parts[4]))
    return nodes


def scan_dev(root: Path) -> list[Node]:
    """Every character device under ROOT/dev (symlinks not followed), paths as the board sees them."""
    dev = root / "dev"
    if not dev.is_dir():
        raise DeviceScanError(f"{dev}: not a directory")
    nodes = []
    for dirpath, dirnames, filenames in os.walk(dev):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue  # a node that went away while walking
            if stat.S_ISCHR(st.st_mode):
                nodes.append(Node("/" + str(p.relative_to(root)), os.major(st.st_rdev), os.minor(st.st_rdev),
                                  _group_name(st.st_gid)))
    return sorted(nodes, key=lambda x: x.path)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def is_gpu_node(path: str) -> bool:
    rel = path.removeprefix("/dev/")
    return any(fnmatch.fnmatchcase(rel, pat) and (pat.count("/") == rel.count("/")) for pat in GPU_NODES)


def plan(nodes: list[Node], majors: dict[int, list[str]]) -> Plan:
    gpu = [n for n in nodes if is_gpu_node(n.path)]
    by_major: dict[int, list[Node]] = {}
    for n in nodes:
        by_major.setdefault(n.major, []).append(n)
    name_majors: dict[str, set[int]] = {}
    for major, names in majors.items():
        for name in names:
            name_majors.setdefault(name, set()).add(major)

    def whole(major: int) -> str | None:
        """The /proc/devices name under which this major can be opened whole, or None."""
        names = majors.get(major, [])
        if len(names) != 1 or names[0] in SHARED_GROUPS:
            return None
        # Every major of that name (char-NAME opens them all) must hold GPU nodes only.
        for m in name_majors[names[0]]:
            if any(not is_gpu_node(n.path) for n in by_major.get(m, [])):
                return None
        return names[0]

    allow, notes, done_names = [], [], set()
    for major in sorted({n.major for n in gpu}):
        mine = sorted((n for n in gpu if n.major == major), key=lambda x: x.path)
        name = whole(major)
        if name is not None:
            if name not in done_names:
                done_names.add(name)
                allow.append(f"char-{name} rw")
                ms = sorted(name_majors[name])
                notes.append(f"char-{name}: major {', '.join(map(str, ms))} in /proc/devices, "
                             f"{len([n for n in gpu if n.major in ms])} GPU node(s), nothing else")
            continue
        label = ", ".join(majors.get(major, ["unregistered"]))
        others = [n.path for n in by_major.get(major, []) if not is_gpu_node(n.path)]
        why = f"shared with {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else "by path"
        notes.append(f"major {major} ({label}): {why}; opened node by node")
        allow.extend(f"{n.path} rw" for n in mine)
    groups = sorted({n.group for n in gpu if n.group not in ("root", "0")})
    return Plan(allow=allow, groups=groups, gpu_nodes=gpu, notes=notes)


def render_dropin(p: Plan, source: str) -> str:
    lines = [
        "# Written by `naturelm-edge jetson-devices` (scripts/install-jetson.sh) from " + source + ".",
        "# The GPU device nodes the service may open under DevicePolicy=closed; re-run the installer after a JetPack",
        "# upgrade (driver majors and names can change). edge/jetson_devices.py explains the rules.",
    ]
    lines += [f"#   {note}" for note in p.notes]
    lines.append("[Service]")
    lines += [f"DeviceAllow={a}" for a in p.allow]
    if p.groups:
        lines.append(f"SupplementaryGroups={' '.join(p.groups)}")
    return "\n".join(lines) + "\n"


def build(root: Path, listing: Path | None = None, proc_devices: Path | None = None) -> tuple[Plan, str]:
    pd = proc_devices or root / "proc" / "devices"
    try:
        majors = parse_proc_devices(pd.read_text(), str(pd))
    except OSError as e:
        raise DeviceScanError(f"{pd}: cannot read it ({e.strerror})") from None
    if listing is not None:
        try:
            nodes = parse_listing(listing.read_text(), str(listing))
        except OSError as e:
            raise DeviceScanError(f"{listing}: cannot read it ({e.strerror})") from None
        source = f"{pd} and {listing}"
    else:
        nodes = scan_dev(root)
        source = f"{pd} and {root / 'dev'}"
    return plan(nodes, majors), source


def cmd_jetson_devices(args: argparse.Namespace) -> int:
    root = Path(args.root)
    p, source = build(root, Path(args.listing) if args.listing else None,
                      Path(args.proc_devices) if args.proc_devices else None)
    if not p.gpu_nodes:
        print(f"naturelm-edge: no GPU device nodes under {root / 'dev'} (looked for {', '.join(GPU_NODES)}); "
              "nothing to allow", file=sys.stderr)
        return 1
    text = render_dropin(p, source)
    if args.write:
        for d in args.write:
            out = Path(d) / DROPIN_NAME
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
            print(f"wrote {out}: {len(p.allow)} DeviceAllow line(s) for {len(p.gpu_nodes)} GPU node(s)")
    else:
        sys.stdout.write(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "jetson-devices",
        help="print (or --write) the systemd drop-in that lets the hardened units open this board's GPU nodes",
        description=(
            "Read /proc/devices and /dev under ROOT and print the DeviceAllow= and SupplementaryGroups= lines that "
            "open the GPU's device nodes (nvgpu, nvmap, host1x-fence, the DRM render node, /dev/nvidia*) and nothing "
            "else, for naturelm-edge.service's DevicePolicy=closed. Whole /proc/devices groups where every node is "
            "the GPU's; node by node where a major is shared (misc, drm). Exit 1 when no GPU node is found."
        ),
    )
    p.add_argument("--root", default="/", metavar="DIR", help="the board's root (default /)")
    p.add_argument("--listing", metavar="FILE",
                   help="read the nodes from this file instead of ROOT/dev: lines of "
                        "`find /dev -type c -exec stat -c '%%n %%t %%T %%U %%G %%a' {} +`")
    p.add_argument("--proc-devices", metavar="FILE", help="read this file instead of ROOT/proc/devices")
    p.add_argument("--write", metavar="DIR", action="append",
                   help=f"write {DROPIN_NAME} into DIR (a unit's .d directory; repeatable) instead of printing it")
    p.set_defaults(func=cmd_jetson_devices)
