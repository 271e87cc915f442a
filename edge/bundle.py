"""The model bundle: the contract between the workstation (export, quantize) and the device.

A bundle is a directory: `manifest.json` + `audio_encoder.<precision>.onnx` + `llm-<type>.gguf` (+ an optional LoRA
adapter GGUF). The manifest says everything the device needs, so nothing is hard-coded twice:

    {
      "format": "naturelm-edge-bundle", "format_version": 1,
      "created": ISO 8601 UTC, "tools": {package: version},
      "source": {"naturelm": {"sha256": ..., "config_sha256": ...}, "llama": {"sha256": ...}},
      "audio": {  # written by `export` (export/onnx_export.py)
        "sample_rate", "clip_seconds", "fbank": FbankSpec dict, "frames", "mel_bins",
        "resampler": ResamplerSpec dict (resampy kaiser_best; absent in bundles before it: WindowedSincSpec),
        "embeddings_per_clip", "embedding_width", "input_name", "output_name",
        "encoders": {precision (fp32 | fp16 | int8): {
          "file": "audio_encoder.<precision>.onnx", "opset": 17,
          "verification": {  # against the PyTorch float32 reference, on fixed and random inputs
            "against", "max_abs_error", "reference_max_abs", "mean_cosine", "min_cosine",
            "inputs": {name: {"shape", "max_abs_error", "mean_cosine", "min_cosine"}},
            "tolerance": {"max_abs_error_relative_to_output_scale" (null: not bounded), "mean_cosine"},
            "passed": true,
            # fp16 only: largest |x| entering LayerNorm/Softmax in the float32 graph, and float16's limit
            "fp32_activation_ranges_on_chirp": {...}, "float16_max": 65504.0
          }}}
      },
      "llm": {  # written by `quantize` (quantize/build.py); read by edge/llm.py
        "n_embd", "n_vocab" (with NatureLM's [PAD]), "n_layer", "n_ctx" (the device's context), "n_ctx_train",
        "prompt": PromptTemplate dict,
        "token_ids": {"bos", "stop": [ids of prompt.stop_tokens], "yes", "no", "pad"},  # checked against the GGUF
        "text": {"skip_special_tokens": true, "clean_up_tokenization_spaces"},  # how answer tokens become text
        "models": {type ("Q4_K_M", "Q8_0", "F16", ...): {"file", "bytes",
                   "quality": null (the F16 reference) or {"reference": "F16", "kl_mean", "kl_p95", "kl_max",
                               "top1_agreement", "positions", "prompts", "yes_no_prompts",
                               "yes_no_decision_agreement", "yes_no_abs_dp_mean", "yes_no_abs_dp_max",
                               "label_prompts", "label_top1_agreement", "answer_token_agreement",
                               "answers_identical", "probe": {...}}}},
        "default_model": type,
        "lora": {"mode": "merge" | "adapter" | "none", "merging_alpha", "adapter_file" (adapter mode, else null),
                 "alpha", "rank"},
        "source": {"llama_sha256", "naturelm_sha256"}, "tools": {package: version}
      },
      "files": {name: {"sha256", "size"}}
    }

Each side writes its own section with `update_manifest`; the device opens a bundle with `load_bundle`, which refuses
one whose manifest or any file's size or hash does not check out, naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge.errors import BundleError
from edge.hashing import sha256_file

logger = logging.getLogger(__name__)

FORMAT = "naturelm-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _read_manifest(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: bundle manifest not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a naturelm-edge bundle manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format_version {version!r}; this naturelm-edge reads version {FORMAT_VERSION}"
        )
    return manifest


def update_manifest(bundle_dir: Path, section: str, data: dict, files: list[str] = (), tools: dict | None = None,
                    source: dict | None = None) -> dict:
    """Merge `data` into `manifest[section]`, record the size and sha256 of `files` (names relative to the bundle),
    and write the manifest atomically (a crash leaves the previous manifest, never half of one)."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    path = bundle_dir / MANIFEST
    if path.exists():
        manifest = _read_manifest(bundle_dir)
    else:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": {}, "tools": {}, "source": {}}
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    section_data = manifest.setdefault(section, {})
    section_data.update(data)
    for name in files:
        f = bundle_dir / name
        manifest["files"][name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest["tools"].update(tools or {})
    manifest["source"].update(source or {})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return manifest


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def bundle_id(self) -> str:
        """Short stable id: the first 12 hex digits of the manifest's file hashes, hashed together."""
        import hashlib

        h = hashlib.sha256()
        for name, info in sorted(self.manifest.get("files", {}).items()):
            h.update(f"{name}:{info['sha256']}\n".encode())
        return h.hexdigest()[:12]

    def section(self, name: str) -> dict:
        if name not in self.manifest:
            raise BundleError(f"{self.path / MANIFEST}: no {name!r} section (the bundle was built without it)")
        return self.manifest[name]

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(f"{self.path / MANIFEST}: {name} is not listed in the manifest's files")
        return self.path / name


#: In the state directory: sha256 of bundle files already verified, by file identity (see HashCache).
HASH_CACHE = "bundle-hashes.json"


class HashCache:
    """sha256 of files verified before, keyed by path and file identity (device, inode, size, mtime in ns), so that
    a restart does not re-hash a multi-GB bundle: a service that restarts every few minutes (a dead microphone
    before the daemon pinged the watchdog regardless) spent most of its life hashing. Any change to a file (a copy,
    an edit, a new file under the same name) changes its inode, size or mtime, and the file is hashed again. The
    cache is one JSON file written like the manifest: to a temporary file, then renamed over the old one.

    It guards against corruption between the workstation and the card (a truncated copy, a bad transfer), which is
    what `verify: full` is for; it does not guard against a file rewritten in place with its mtime forged back."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / HASH_CACHE
        try:
            data = json.loads(self.path.read_text())
            self.entries = data["files"] if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}
        except (OSError, UnicodeDecodeError, ValueError):
            self.entries = {}
        self.hits = 0

    @staticmethod
    def identity(st: os.stat_result) -> list:
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]

    def get(self, f: Path, st: os.stat_result) -> str | None:
        entry = self.entries.get(str(f.resolve()))
        if isinstance(entry, dict) and entry.get("identity") == self.identity(st):
            self.hits += 1
            return entry.get("sha256")
        return None

    def put(self, f: Path, st: os.stat_result, digest: str) -> None:
        self.entries[str(f.resolve())] = {"identity": self.identity(st), "sha256": digest}

    def save(self) -> None:
        """Best effort: a cache that cannot be written only costs the next start a re-hash."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"files": self.entries}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("cannot write the bundle hash cache %s (%s); the next start hashes the bundle again",
                           self.path, e.strerror or e)


def load_bundle(bundle_dir: Path, verify: str = "full", cache_dir: Path | None = None) -> Bundle:
    """Open a bundle and check it. verify: "full" (size + sha256 of every file), "size", or "none". With
    `cache_dir` (the daemon's state directory), "full" hashes each file once per file identity (HashCache)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: bundle directory not found")
    manifest = _read_manifest(bundle_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{bundle_dir / MANIFEST}: lists no files")
    cache = HashCache(cache_dir) if verify == "full" and cache_dir is not None else None
    hashed = 0
    for name, info in sorted(files.items()):
        f = bundle_dir / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing")
        st = f.stat()
        if verify in ("full", "size") and st.st_size != info.get("size"):
            raise BundleError(f"{f}: size {st.st_size} does not match the manifest ({info.get('size')}); "
                              "the file is truncated or was replaced")
        if verify == "full":
            digest = cache.get(f, st) if cache is not None else None
            if digest is None:
                digest = sha256_file(f)
                hashed += 1
            if digest != info.get("sha256"):
                raise BundleError(f"{f}: sha256 {digest[:16]}... does not match the manifest "
                                  f"({str(info.get('sha256'))[:16]}...); the file is corrupt or was replaced")
            if cache is not None:
                cache.put(f, st, digest)
    if cache is not None:
        if hashed:
            cache.save()
        logger.info("bundle %s: sha256 of %d file(s) checked, %d hashed now, %d unchanged since verified (%s)",
                    bundle_dir, len(files), hashed, cache.hits, cache.path)
    return Bundle(path=bundle_dir, manifest=manifest)
