"""A stand-in for edge.pipeline with the same interface, for in-process tests of the daemon's own machinery (threads,
watchdog, outbox) where the model's answers do not matter and a test must make the model hang at will. The end-to-end
tests (test_daemon_e2e.py) run the real pipeline on the tiny bundle.

`running` (an Event) blocks `process` while it is clear: a hung model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from edge.events import Event


@dataclass
class WindowResult:
    events: list
    gated: bool
    timings: dict
    embedding: np.ndarray | None = None


@dataclass
class FakePipeline:
    prompts: list
    device_id: str
    running: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=lambda: {"bundle_id": "fake0000", "quantization": "none",
                                                "encoder_provider": "cpu", "encoder_precision": "fp32",
                                                "llm_offload": "none"})

    def __post_init__(self):
        self.running.set()

    def set_prompts(self, prompts) -> None:
        self.prompts = list(prompts)

    def process(self, samples, sample_rate, window, source) -> WindowResult:
        self.running.wait()
        model = {k: self.info[k] for k in ("bundle_id", "quantization", "encoder_provider", "encoder_precision")}
        events = [Event(device_id=self.device_id, source=source, window=window, prompt_id=p.id, kind="yes_no",
                        answer="Yes", score=1.0, model=model, timing_ms={"llm": 1.0}, question=p.text, positive=True)
                  for p in self.prompts if p.due(window.index)]
        return WindowResult(events=events, gated=False, timings={"llm": 1.0},
                            embedding=np.zeros((4, 8), dtype=np.float32))
