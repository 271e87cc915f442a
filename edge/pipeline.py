"""One window of audio in, events out: the pipeline both `infer` and the daemon run.

samples (any rate, mono) -> activity gate -> front end (resample, fbank, normalise: numpy) -> audio encoder
(onnxruntime) -> LLM engine (llama.cpp: the audio prefix decoded once, then every due prompt) -> events.
Every number the device needs (rates, fbank, prompt pieces, token ids) comes from the bundle's manifest.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.bundle import MANIFEST, Bundle, load_bundle
from edge.encoder import AudioEncoder
from edge.errors import BundleError
from edge.events import Event, WindowInfo
from edge.frontend import AudioFrontEnd
from edge.llm import EngineOptions, LlmEngine, Prompt
from edge.prompts import PromptSpec
from edge.spec import FbankSpec, resampler_from_dict
from edge.windowing import ActivityGate

logger = logging.getLogger(__name__)


@dataclass
class WindowResult:
    events: list[Event]
    gated: bool  # True when the activity gate skipped the window (no model work, no events)
    timings: dict = field(default_factory=dict)
    embedding: np.ndarray | None = None  # mean of the window's audio embeddings (for similarity search)


def _engine_prompt(p: PromptSpec) -> Prompt:
    text = p.kind in ("open", "caption")
    return Prompt(id=p.id, kind=p.kind, question=p.text, labels=tuple(p.labels),
                  max_new_tokens=p.max_tokens if text else None, num_beams=p.num_beams if text else None)


def _count_value(text: str):
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


class Pipeline:
    def __init__(self, bundle: Bundle, encoder: AudioEncoder, llm: LlmEngine, prompts: list[PromptSpec], *,
                 device_id: str, gate: ActivityGate | None = None):
        audio = bundle.section("audio")
        self.bundle = bundle
        self.encoder = encoder
        self.llm = llm
        self.device_id = device_id
        self.gate = gate or ActivityGate(None)
        # The bundle names its resampling filter; one made before that field existed used torchaudio's windowed sinc
        # and keeps it (the front end warns once that upstream's is resampy's).
        try:
            sinc = resampler_from_dict(audio.get("resampler"))
        except (TypeError, ValueError) as e:
            raise BundleError(f"{bundle.path / MANIFEST}: {e}") from None
        self.frontend = AudioFrontEnd(FbankSpec.from_dict(audio["fbank"]), float(audio["clip_seconds"]), sinc=sinc)
        self.sample_rate = int(audio["sample_rate"])
        self.clip_seconds = float(audio["clip_seconds"])
        self.windows_processed = 0
        self.set_prompts(prompts)
        self.info = {
            "bundle_id": bundle.bundle_id,
            "quantization": llm.model_type,
            "encoder_provider": encoder.provider,
            "encoder_precision": encoder.precision,
            # llama.cpp's own "offloaded N/M layers to GPU" (M: the model's layers + the output layer)
            "llm_offload": llm.offload_text,
        }

    def set_prompts(self, prompts: list[PromptSpec]) -> None:
        """Replace the prompt list (SIGHUP). Engine prompts are validated up front, so a bad list changes nothing: also
        against the open LLM (a prompt with more beams than it was opened for needs a restart)."""
        engine_prompts = {p: _engine_prompt(p) for p in prompts}
        check = getattr(self.llm, "check_prompts", None)
        if check is not None:
            check(list(engine_prompts.values()))
        self._engine_prompts = engine_prompts
        self.prompts = list(prompts)

    def _model_info(self) -> dict:
        return {k: self.info[k] for k in ("bundle_id", "quantization", "encoder_provider", "encoder_precision")}

    def process(self, samples: np.ndarray, sample_rate: int, window: WindowInfo, source: str,
                prompts: list[PromptSpec] | None = None) -> WindowResult:
        """Run the due prompts on one window. `prompts` overrides the list for this window (a scheduler that sheds
        load passes a subset)."""
        t0 = time.perf_counter()
        if not self.gate.passes(samples):
            return WindowResult(events=[], gated=True, timings={"total": (time.perf_counter() - t0) * 1e3})
        features = self.frontend.features(samples, sample_rate, name=source)
        t1 = time.perf_counter()
        embeddings = self.encoder.encode(features)[0]
        t2 = time.perf_counter()
        due = [p for p in (self.prompts if prompts is None else prompts) if p.due(window.index)]
        events = []
        llm_ms = 0.0
        if due:
            llm_ms += self.llm.set_audio(embeddings)
            for spec in due:
                answer = self.llm.ask(self._engine_prompts.get(spec) or _engine_prompt(spec))
                llm_ms += answer.timings.total_ms
                events.append(self._event(spec, answer, window, source))
        t3 = time.perf_counter()
        timings = {"frontend": (t1 - t0) * 1e3, "encoder": (t2 - t1) * 1e3, "llm": llm_ms, "total": (t3 - t0) * 1e3}
        for e in events:
            e.timing_ms = dict(timings)
        self.windows_processed += 1
        return WindowResult(events=events, gated=False, timings=timings, embedding=embeddings.mean(axis=0))

    def process_batch(self, items: list[tuple[np.ndarray, int, WindowInfo]], source: str,
                      prompts: list[PromptSpec] | None = None) -> list[WindowResult]:
        """`process` for several windows of one source at once: the front end per window, then every passing
        window's features through the audio encoder in one call (its graph has a dynamic batch axis), then the LLM:
        batched too (LlmEngine.answer_windows) when the engine was opened with max_batch > 1, else window by window.
        With exact batches (the default) the answers are bit for bit those of `process` window by window; with shared
        ones they are within rounding (tests/test_batch.py compares them)."""
        t0 = time.perf_counter()
        results: list[WindowResult | None] = [None] * len(items)
        todo, feats, front_ms = [], [], []
        for i, (samples, rate, window) in enumerate(items):
            t = time.perf_counter()
            if not self.gate.passes(samples):
                results[i] = WindowResult(events=[], gated=True, timings={"total": (time.perf_counter() - t) * 1e3})
                continue
            feats.append(self.frontend.features(samples, rate, name=source))
            front_ms.append((time.perf_counter() - t) * 1e3)
            todo.append(i)
        if not todo:
            return results
        t1 = time.perf_counter()
        # Exact batches (the LLM's default) encode window by window too: a batched call rounds differently.
        exact = bool(getattr(self.llm, "exact", True))
        embeddings = self.encoder.encode_batch(np.concatenate(feats), exact=exact)  # each is (1, frames, mel_bins)
        encoder_ms = (time.perf_counter() - t1) * 1e3 / len(todo)  # the batch's time, shared evenly
        dues = [[p for p in (self.prompts if prompts is None else prompts) if p.due(items[i][2].index)] for i in todo]
        batched = None
        if self.llm_batched:
            # The LLM side in one llama.cpp context too: the audio prefixes prefilled together, each prompt asked of
            # every window that has it at once, the answers' tokens decoded for all of them step by step.
            engine = [[self._engine_prompts.get(spec) or _engine_prompt(spec) for spec in due] for due in dues]
            batched = self.llm.answer_windows([embeddings[j] for j in range(len(todo))], engine)
        for j, i in enumerate(todo):
            samples, rate, window = items[i]
            emb = embeddings[j]
            events, llm_ms = [], 0.0
            if batched is not None:
                wa = batched[j]
                llm_ms = wa.total_ms
                events = [self._event(spec, answer, window, source) for spec, answer in zip(dues[j], wa.answers)]
            elif dues[j]:
                llm_ms += self.llm.set_audio(emb)
                for spec in dues[j]:
                    answer = self.llm.ask(self._engine_prompts.get(spec) or _engine_prompt(spec))
                    llm_ms += answer.timings.total_ms
                    events.append(self._event(spec, answer, window, source))
            timings = {"frontend": front_ms[j], "encoder": encoder_ms, "llm": llm_ms,
                       "total": front_ms[j] + encoder_ms + llm_ms}
            for e in events:
                e.timing_ms = dict(timings)
            self.windows_processed += 1
            results[i] = WindowResult(events=events, gated=False, timings=timings, embedding=emb.mean(axis=0))
        logger.debug("batch of %d windows in %.0f ms", len(items), (time.perf_counter() - t0) * 1e3)
        return results

    @property
    def llm_batched(self) -> bool:
        """Whether process_batch batches the LLM side (the engine holds more than one window's slot)."""
        return getattr(self.llm, "max_batch", 1) > 1

    def _event(self, spec: PromptSpec, answer, window: WindowInfo, source: str) -> Event:
        score, positive = answer.score, None
        text = answer.text.strip()
        if spec.kind == "yes_no":
            positive = score >= spec.threshold
            value = "Yes" if positive else "No"
        elif spec.kind == "label":
            value = text
            positive = score is not None and score >= spec.threshold
        elif spec.kind == "count":
            value = _count_value(text)
        else:
            value = text
        decoding = {"method": answer.decoding, "num_beams": answer.num_beams} if answer.decoding else None
        return Event(device_id=self.device_id, source=source, window=window, prompt_id=spec.id, kind=spec.kind,
                     answer=value, score=score, positive=positive, model=self._model_info(), timing_ms={},
                     question=spec.text, decoding=decoding)

    def close(self) -> None:
        self.llm.close()


def open_pipeline(bundle_dir: Path, prompts: list[PromptSpec], *, device_id: str, provider: str = "auto",
                  precision: str = "fp32", quantization: str | None = None, n_gpu_layers: int | None = None,
                  state_dir: Path | None = None, verify: str = "full", gate_dbfs: float | None = None,
                  lora_scale: float | None = None, threads: int = 0, llm_threads: int | None = None,
                  max_batch: int = 1, shared_batches: bool = False) -> Pipeline:
    """Load and check the bundle, open the encoder and the LLM (both warmed up), ready for `process`. max_batch:
    windows `process_batch` runs through the LLM together (its KV cache holds max_batch windows); shared_batches:
    they share llama.cpp calls (EngineOptions.exact_batches False: faster captions, answers within rounding)."""
    bundle = load_bundle(Path(bundle_dir), verify=verify, cache_dir=state_dir)
    encoder = AudioEncoder(bundle, precision=precision, provider=provider, state_dir=state_dir, threads=threads)
    # The LLM is opened for these prompts: its KV cache holds the beams and the context they need, no more.
    llm = LlmEngine.from_bundle(bundle, EngineOptions(model_type=quantization, n_gpu_layers=n_gpu_layers,
                                                       lora_scale=lora_scale, n_threads=llm_threads,
                                                       max_batch=max_batch, exact_batches=not shared_batches,
                                                       prompts=tuple(_engine_prompt(p) for p in prompts)))
    return Pipeline(bundle, encoder, llm, prompts, device_id=device_id, gate=ActivityGate(gate_dbfs))
