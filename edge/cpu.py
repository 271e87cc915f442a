"""What this CPU offers integer matrix products, so that every accuracy figure and failure says where it came from.

onnxruntime's MLAS picks its int8 kernel at run time from the CPU's features, and the same int8 graph gives different
numbers on different CPUs:
- x86 with AVX-512 VNNI or AVX-VNNI: `vpdpbusd`, u8 x s8 products summed in 32 bits: exact;
- x86 with AVX2 only (or AVX-512 without VNNI): `vpmaddubsw` adds pairs of u8 x s8 products into a *saturating* int16
  before widening, so two large products (|u8 * s8| up to 32385 each) overflow: a u8s8 graph loses accuracy there.
  u8 x u8 is computed by widening to 16 bits first (`vpmaddwd`): no saturation;
- arm64 (Jetson Orin's Cortex-A78AE) with the dot-product extension (`asimddp`): `sdot`/`udot`, exact; with i8mm
  (`smmla`) also exact.

The features come from the CPUID that the running process sees, as numpy's runtime dispatch reads it (the same
instruction onnxruntime's MLAS asks), not from /proc/cpuinfo alone: under an emulator, in a VM that masks features, or
in a container, /proc/cpuinfo can describe another CPU than the one the kernels are chosen for. /proc/cpuinfo adds the
model name and the flags numpy does not name (avx_vnni, amx_int8, i8mm), only when it agrees with CPUID on the rest.

The device records this in health and in its encoder self-check, the workstation in the bundle's verification, the
tests in pytest's header, and the benchmarks in their JSON.
"""

from __future__ import annotations

import functools
import platform

#: The flags that decide the int8 path (x86 /proc/cpuinfo "flags", arm64 "Features").
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model or platform.processor() or "unknown", frozenset(flags)


#: Our flag names -> numpy's runtime CPU feature names (numpy/_core/src/common/npy_cpu_features.h).
_NUMPY_NAMES = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI",
                "asimddp": "ASIMDDP", "sve": "SVE"}


def _numpy_features() -> dict | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # numpy 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats  # numpy 1.x (JetPack's)
        except ImportError:
            return None
    return dict(feats)


@functools.lru_cache(maxsize=1)
def _flags() -> tuple[frozenset, str]:
    """(flags, where they came from)."""
    proc = _cpuinfo()[1]
    feats = _numpy_features()
    if not feats:
        return proc, "/proc/cpuinfo"
    known = {f: n for f, n in _NUMPY_NAMES.items() if n in feats}
    flags = {f for f, n in known.items() if feats[n]}
    if all((f in proc) == (f in flags) for f in known):
        flags |= {f for f in ("avx_vnni", "amx_int8", "i8mm") if f in proc}
        return frozenset(flags), "cpuid"
    return frozenset(flags), "cpuid (differs from /proc/cpuinfo: emulated or masked CPU)"


def int8_kernel(machine: str | None = None, flags=None) -> str:
    """A short name for the int8 matrix-product path onnxruntime's CPU kernels take here."""
    machine = (machine or platform.machine()).lower()
    flags = _flags()[0] if flags is None else frozenset(flags)
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "amx_int8" in flags:
            return "x86-amx"
        if "avx512_vnni" in flags:
            return "x86-avx512vnni"
        if "avx_vnni" in flags:
            return "x86-avxvnni"
        if "avx512bw" in flags:
            return "x86-avx512bw-saturating-u8s8"
        if "avx2" in flags:
            return "x86-avx2-saturating-u8s8"
        return "x86-sse"
    if machine in ("aarch64", "arm64"):
        if "i8mm" in flags:
            return "arm64-i8mm"
        if "asimddp" in flags:
            return "arm64-dotprod"
        return "arm64-neon"
    return f"{machine}-generic"


def u8s8_saturates(kernel: str | None = None) -> bool:
    """True where u8 x s8 products go through a saturating int16 pair sum (x86 without VNNI)."""
    return "saturating" in (kernel or int8_kernel())


def cpu_info() -> dict:
    """{"machine", "model", "flags": [the relevant ones present], "flags_from", "int8_kernel"}: JSON-ready."""
    model = _cpuinfo()[0]
    flags, source = _flags()
    return {"machine": platform.machine(), "model": model, "flags": [f for f in RELEVANT_FLAGS if f in flags],
            "flags_from": source, "int8_kernel": int8_kernel(flags=flags)}


def cpu_line() -> str:
    info = cpu_info()
    return f"{info['model']} ({info['machine']}; {' '.join(info['flags']) or 'no SIMD flags read'}; " \
           f"int8 kernel {info['int8_kernel']})"
