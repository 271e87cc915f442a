"""The language side on this machine, on the production-shaped `small` preset (a Llama-3.2-1B-shaped backbone with
the real Llama 3 vocabulary size, 128257 rows with [PAD]; random weights, NatureLM LoRA rank 32 merged at 1.0).

Measured (one run; figures printed and saved to benchmarks/results/llm.json):
- conversion: `naturelm-edge quantize --type F16` in a child process: wall time and its own peak RSS (VmHWM), next to
  the model's size; then llama.cpp's quantizer per type, also in child processes;
- memory bandwidth: numpy sum (read) and copy over 512 MiB arrays, 1 thread and one per core, best of several; the
  decode roofline of a GGUF is bandwidth / weight bytes read per token (every tensor of the GGUF except the token
  embedding table, of which decoding reads one row);
- per quantization (Q4_K_M, Q8_0): prefill tokens/s (a 256-token text prompt; the window's 40-position audio prefix),
  decode tokens/s of the engine and of a bare llama.cpp loop over the same file (llama_decode of one token +
  argmax of the logits, nothing else), both as fractions of the decode roofline; quality (KL, top-1) against F16;
- the window: K = 1, 2, 4, 8 yes/no prompts with the audio prefix shared vs re-prefilled for each prompt, next to the
  ratio of prefilled tokens K(P+Q) / (P+KQ) (prefix P, mean question Q);
- `yes_no` scoring (one forward pass) vs generating the answer text (greedy, up to 3 tokens).

After a warm-up, timed runs are repeated (--repeats) and the fastest kept (on a shared machine the least disturbed
run is the best estimate); the engine and the bare loop, and the shared and re-prefilled windows, alternate so that
load from elsewhere lands on both.

    PYTHONPATH=. python benchmarks/bench_llm.py [--work DIR] [--threads N] [--repeats 3] [--no-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "llm.json"
QUANTS = ("Q4_K_M", "Q8_0")
AIMS = {"window_saving_vs_token_ratio": 0.8, "engine_vs_bare_decode_max_slowdown": 0.05}
WINDOW_QUESTIONS = (
    "Is there a American Crow in the audio? Answer Yes or No.",
    "Is there a Common Raven in the audio? Answer Yes or No.",
    "Is there a Blue Jay in the audio? Answer Yes or No.",
    "Is there a Song Sparrow in the audio? Answer Yes or No.",
    "Is there a Humpback Whale in the audio? Answer Yes or No.",
    "Is there a Gray Wolf in the audio? Answer Yes or No.",
    "Is there a Spring Peeper in the audio? Answer Yes or No.",
    "Is there a Mallard in the audio? Answer Yes or No.",
)


def log(msg: str) -> None:
    print(f"[bench_llm] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Building the bundle


def build(work: Path, threads: int, quality: bool) -> dict:
    from edge.bundle import update_manifest
    from export.tiny_model import build_tiny_model
    from quantize.build import model_file
    from quantize.peak_rss import measure

    out: dict = {}
    small = work / "small"
    if not (small / "llama" / "model.safetensors").is_file() or not (small / "naturelm" / "model.safetensors").is_file():
        log("writing the small preset (a few minutes)")
        t0 = time.perf_counter()
        build_tiny_model(small, preset="small", seed=0)
        out["preset_build_s"] = time.perf_counter() - t0
    naturelm_dir, llama_dir = small / "naturelm", small / "llama"
    bundle = work / "bundle"
    log("converting to F16 in a child process")
    conv = measure(["cli", "quantize", "--naturelm", str(naturelm_dir), "--llama", str(llama_dir), "--out",
                    str(bundle), "--type", "F16", "--no-quality", "--no-progress"],
                   report=work / "rss.json", log=work / "convert.log")
    if conv["rc"] != 0:
        raise SystemExit(f"conversion failed; see {work / 'convert.log'}")
    out["conversion"] = {
        "seconds": conv["seconds"],
        "peak_rss_bytes": conv["peak_rss"],
        "llama_safetensors_bytes": (llama_dir / "model.safetensors").stat().st_size,
        "f16_gguf_bytes": (bundle / model_file("F16")).stat().st_size,
        "note": "whole `naturelm-edge quantize --type F16 --no-quality` command (interpreter, torch import by the "
                "NatureLM loader, sha256 of the inputs, the conversion)",
    }
    out["quantization"] = {}
    for q in QUANTS:
        log(f"quantizing to {q} in a child process")
        r = measure(["quantize", str(bundle / model_file("F16")), str(bundle / model_file(q)), q],
                    report=work / "rss.json", log=work / f"quantize-{q}.log")
        if r["rc"] != 0:
            raise SystemExit(f"quantization failed; see {work / f'quantize-{q}.log'}")
        out["quantization"][q] = {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss"],
                                  "gguf_bytes": (bundle / model_file(q)).stat().st_size}
    manifest = json.loads((bundle / "manifest.json").read_text())
    llm = manifest["llm"]
    models = dict(llm["models"])
    for q in QUANTS:
        models[q] = {"file": model_file(q), "bytes": (bundle / model_file(q)).stat().st_size, "quality": None}
    if quality:
        from quantize.quality import build_probe, compare

        log("quality probe (F16 reference, 1 clip x 8 questions)")
        probe = build_probe(bundle / model_file("F16"), llm, clips=1, n_threads=threads)
        for q in QUANTS:
            models[q]["quality"] = compare(probe, bundle / model_file(q), llm, n_threads=threads)
    update_manifest(bundle, "llm", {"models": models, "default_model": "Q4_K_M"}, files=[model_file(q) for q in QUANTS])
    out["quality"] = {q: models[q]["quality"] for q in QUANTS}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Machine


def bandwidth(size_mib: int = 512, repeats: int = 5) -> dict:
    n = size_mib * 2**20 // 8
    a = np.ones(n)
    b = np.empty_like(a)
    cores = len(os.sched_getaffinity(0))

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def parallel(op):
        parts = np.array_split(np.arange(n), cores)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

        def run():
            ts = [threading.Thread(target=op, args=bd) for bd in bounds]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return run

    read1 = a.nbytes / timed(lambda: a.sum())
    copy1 = 2 * a.nbytes / timed(lambda: np.copyto(b, a))
    readn = a.nbytes / timed(parallel(lambda i, j: a[i:j].sum()))
    copyn = 2 * a.nbytes / timed(parallel(lambda i, j: np.copyto(b[i:j], a[i:j])))
    return {"read_1_thread": read1, "copy_1_thread": copy1, f"read_{cores}_threads": readn,
            f"copy_{cores}_threads": copyn, "roofline_basis": max(read1, readn), "unit": "bytes/s",
            "array_mib": size_mib}


def gguf_bytes(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {"tensor_bytes": total, "token_embd_bytes": int(embd.n_bytes),
            "read_per_token": total - int(embd.n_bytes) + int(embd.n_bytes) // int(embd.shape[-1])}


# ---------------------------------------------------------------------------------------------------------------------
# A bare llama.cpp decode loop (the baseline the engine's decode is held to)


class BareLlama:
    def __init__(self, path: Path, n_ctx: int, threads: int, n_gpu_layers: int):
        from edge.llm import llama_lib

        lib = self.lib = llama_lib()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, min(n_ctx, 2048), 512, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(512, 0, 1)
        for i in range(512):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0

    def _decode(self, tokens, pos0: int) -> None:
        b = self.batch
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.logits[i] = t, pos0 + i, int(i == len(tokens) - 1)
        b.n_tokens = len(tokens)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, tokens) -> float:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        self._decode(tokens, 0)
        return time.perf_counter() - t0

    def decode(self, prompt, n: int) -> float:
        """Greedy: n single-token decodes after `prompt`; seconds per token."""
        self.prefill(prompt)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            self._decode([int(np.argmax(logits))], pos)
            pos += 1
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


# ---------------------------------------------------------------------------------------------------------------------
# Engine measurements


def best(xs):
    """The fastest of the repeats: on a shared machine the least disturbed run is the best estimate of the cost."""
    return min(xs)


def measure_model(bundle_dir: Path, qtype: str, threads: int, repeats: int, bw: float, full: bool) -> dict:
    from edge.bundle import load_bundle
    from edge.llm import EngineOptions, LlmEngine, Prompt
    from quantize.build import model_file

    bundle = load_bundle(bundle_dir, verify="size")
    engine = LlmEngine.from_bundle(bundle, EngineOptions(model_type=qtype, n_threads=threads))
    bare = BareLlama(bundle_dir / model_file(qtype), engine.n_ctx, threads, engine.n_gpu_layers)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((29, engine.n_embd)).astype(np.float32)  # token-embedding scale in this preset
    sizes = gguf_bytes(bundle_dir / model_file(qtype))
    roofline = bw / sizes["read_per_token"]
    n_decode = 32
    text = engine.tokenize("The audio contains the song of a bird singing from a tree at dawn, with wind. " * 20)
    text = [engine.bos_id] + text[:255]

    res: dict = {"gguf": sizes, "decode_roofline_tok_s": roofline}
    # warm-up (not timed): pages the memory-mapped weights in, builds the graphs once
    engine.set_audio(audio)
    engine.ask(Prompt(id="warm", kind="open", question="Caption the audio.", max_new_tokens=4))
    bare.decode(text[:64], 4)
    prefill_text, prefix, eng_dec, bare_dec = [], [], [], []
    caption = Prompt(id="caption", kind="open", question="Caption the audio.", max_new_tokens=n_decode)
    for _ in range(repeats):
        prefill_text.append(bare.prefill(text))
        ms = engine.set_audio(audio)
        prefix.append((engine.prefix_tokens, ms))
        ans = engine.ask(caption)
        eng_dec.append(ans.timings.decode_ms / 1e3 / max(1, ans.timings.decode_tokens))
        # the same number of positions before the answer as the engine's (the audio rows stood in for by a token)
        same_length = engine.prefix_ids() + [engine.bos_id] * 29 + engine.suffix_ids(caption.question)
        bare_dec.append(bare.decode(same_length, n_decode))
    res["prefill_text_256_tok_s"] = len(text) / best(prefill_text)
    res["prefill_audio_prefix"] = {"positions": prefix[0][0], "ms": best(p[1] for p in prefix),
                                   "tok_s": prefix[0][0] / (best(p[1] for p in prefix) / 1e3)}
    res["decode_engine_tok_s"] = 1 / best(eng_dec)
    res["decode_bare_tok_s"] = 1 / best(bare_dec)
    res["engine_decode_slowdown_vs_bare"] = best(eng_dec) / best(bare_dec) - 1
    res["decode_engine_fraction_of_roofline"] = res["decode_engine_tok_s"] / roofline
    res["decode_bare_fraction_of_roofline"] = res["decode_bare_tok_s"] / roofline
    res["prefill_text_fraction_of_decode_roofline"] = res["prefill_text_256_tok_s"] / roofline
    bare.close()

    if full:
        # window: K yes/no prompts, shared prefix vs re-prefilled
        prompts = [Prompt(id=f"q{i}", kind="yes_no", question=q) for i, q in enumerate(WINDOW_QUESTIONS)]
        p_tokens = engine.prefix_tokens
        window = {}
        for k in (1, 2, 4, 8):
            ps = prompts[:k]
            q_tokens = statistics.mean(len(engine.suffix_ids(p.question)) for p in ps)
            shared, again = [], []
            for _ in range(repeats):
                shared.append(engine.run_window(audio, ps).total_ms)
                again.append(engine.run_window(audio, ps, share_prefix=False).total_ms)
            token_ratio = k * (p_tokens + q_tokens) / (p_tokens + k * q_tokens)
            time_ratio = best(again) / best(shared)
            window[str(k)] = {
                "shared_ms": best(shared), "reprefilled_ms": best(again), "time_ratio": time_ratio,
                "token_ratio": token_ratio, "prefix_tokens": p_tokens, "question_tokens": q_tokens,
                "saving_measured": 1 - 1 / time_ratio, "saving_from_tokens": 1 - 1 / token_ratio,
                "saving_vs_token_saving": (1 - 1 / time_ratio) / (1 - 1 / token_ratio) if k > 1 else None,
            }
        res["window"] = window
        # yes_no scoring vs generating the answer text
        q = WINDOW_QUESTIONS[0]
        yn, gen = [], []
        for _ in range(repeats):
            engine.set_audio(audio)
            a = engine.ask(Prompt(id="yn", kind="yes_no", question=q))
            yn.append(a.timings.total_ms)
            g = engine.ask(Prompt(id="gen", kind="open", question=q, max_new_tokens=3))
            gen.append(g.timings.total_ms)
        res["yes_no_vs_generate"] = {"yes_no_ms": best(yn), "generate_ms": best(gen), "generate_tokens": 3,
                                     "speedup": best(gen) / best(yn)}
    engine.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "naturelm-bench-llm")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--reuse-build", action="store_true",
                    help="keep the bundle and the conversion/quantization figures of the last run's JSON; re-time the "
                         "rest (for a rerun on a quieter machine)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from edge.cpu import cpu_info
    from edge.llm import gpu_offload_supported

    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
                    "cpus": len(os.sched_getaffinity(0)), "threads": args.threads,
                    "gpu_offload": gpu_offload_supported(), "loadavg_at_start": os.getloadavg(),
                    "features": cpu_info()},
        "preset": "small (Llama-3.2-1B shape, vocab 128256 + [PAD]; random weights)",
        "aims": AIMS,
    }
    t0 = time.perf_counter()
    if args.reuse_build:
        previous = json.loads(RESULTS.read_text())
        for key in ("conversion", "quantization", "quality", "preset_build_s"):
            if key in previous:
                results[key] = previous[key]
    else:
        results.update(build(args.work, args.threads, not args.no_quality))
    log("measuring memory bandwidth")
    results["bandwidth"] = bw = bandwidth()
    results["models"] = {}
    for q in QUANTS:
        log(f"measuring {q}")
        results["models"][q] = measure_model(args.work / "bundle", q, args.threads, args.repeats,
                                             bw["roofline_basis"], full=(q == "Q4_K_M"))
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - t0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    log(f"saved {RESULTS}")
    return 0


def report(r: dict) -> None:
    gib = 2**30
    c = r["conversion"]
    print(f"\nconversion to F16: {c['seconds']:.0f} s, peak RSS {c['peak_rss_bytes'] / gib:.2f} GiB "
          f"(model {c['llama_safetensors_bytes'] / gib:.2f} GiB bf16 -> {c['f16_gguf_bytes'] / gib:.2f} GiB F16)")
    for q, info in r["quantization"].items():
        qual = r["quality"].get(q)
        qs = (f", KL mean {qual['kl_mean']:.4f} max {qual['kl_max']:.4f}, top-1 {qual['top1_agreement']:.1%}"
              if qual else "")
        print(f"quantize {q}: {info['seconds']:.0f} s, peak RSS {info['peak_rss_bytes'] / gib:.2f} GiB, "
              f"{info['gguf_bytes'] / gib:.2f} GiB{qs}")
    bw = r["bandwidth"]
    print("bandwidth (numpy): " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()
                                                if isinstance(v, float) and k != "roofline_basis"))
    for q, m in r["models"].items():
        print(f"\n{q}: {m['gguf']['read_per_token'] / 2**20:.0f} MiB read per token -> decode roofline "
              f"{m['decode_roofline_tok_s']:.1f} tok/s")
        print(f"  prefill 256-token text {m['prefill_text_256_tok_s']:.1f} tok/s "
              f"({m['prefill_text_fraction_of_decode_roofline']:.2f}x roofline); audio prefix "
              f"{m['prefill_audio_prefix']['positions']} positions in {m['prefill_audio_prefix']['ms']:.0f} ms")
        print(f"  decode engine {m['decode_engine_tok_s']:.2f} tok/s ({m['decode_engine_fraction_of_roofline']:.0%} "
              f"of roofline), bare llama.cpp {m['decode_bare_tok_s']:.2f} tok/s "
              f"({m['decode_bare_fraction_of_roofline']:.0%}); engine slowdown "
              f"{m['engine_decode_slowdown_vs_bare']:+.1%}")
        if "window" in m:
            print("  K  shared ms  re-prefilled ms  time ratio  token ratio  saving/token-saving")
            for k, w in m["window"].items():
                frac = "" if w["saving_vs_token_saving"] is None else f"{w['saving_vs_token_saving']:.0%}"
                print(f"  {k:>1}  {w['shared_ms']:9.0f}  {w['reprefilled_ms']:15.0f}  {w['time_ratio']:10.2f}  "
                      f"{w['token_ratio']:11.2f}  {frac:>19}")
            y = m["yes_no_vs_generate"]
            print(f"  yes_no {y['yes_no_ms']:.0f} ms vs generating 3 tokens {y['generate_ms']:.0f} ms "
                  f"({y['speedup']:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
