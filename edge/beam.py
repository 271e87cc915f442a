"""Beam search as NatureLM-audio decodes: transformers' `generate(num_beams=N, do_sample=False)`, one answer at a time,
as a small state machine over logits. It knows nothing of llama.cpp: the engine (edge/llm.py) decodes the running beams
and feeds their logits in; `step` says which (parent beam, token) pairs run on.

Upstream (NatureLM/models/NatureLM.py, configs/inference.yml) calls `generate(num_beams=2, do_sample=False,
max_new_tokens=300, min_length=1, repetition_penalty=1.0, length_penalty=1.0, temperature=0.1)` with
`early_stopping` left at its default, False. With do_sample=False the temperature is unused, a repetition penalty of
1.0 adds no logits processor, and with `inputs_embeds` transformers lowers min_length by the prompt's length, to 0, so
it adds none either. What is left is the plain beam search below. Its semantics are those of transformers 4.57's
vectorised `_beam_search` (generation/utils.py; 4.56 and earlier used BeamSearchScorer with the same results):

* Scores are sums of log-softmax over the full vocabulary. At each step the `beams_to_keep = max(2, 1 + n_stop) *
  num_beams` best continuations over all running beams are ranked (all from the single prompt at the first step).
* A continuation that ends in a stop token, or reaches max_new_tokens, is a finished hypothesis, taken only when it
  ranks among the first num_beams; its score is its sum / (generated length, stop token included) ** length_penalty.
  The num_beams best finished hypotheses are kept.
* The num_beams best continuations that did not finish run on.
* The search ends when every kept continuation is finished (max_new_tokens reached), or, with early_stopping False,
  when num_beams hypotheses are finished and the best running beam's sum / (its length) ** length_penalty cannot beat
  the worst of them (`_check_early_stop_heuristic`).
* The answer is the best finished hypothesis: without its stop token here (`stopped` says whether it had one).

Arithmetic is float64 over llama.cpp's float32 logits (transformers works in float32): only a near-tie between two
candidates, far below the logit differences between llama.cpp and PyTorch, could order them differently.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: transformers' default (GenerationConfig.length_penalty) and upstream's configs/inference.yml.
LENGTH_PENALTY = 1.0


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class BeamSearch:
    """One answer's beam search. Call `step(logits)` with one row per running beam (the prompt's single row at first)
    until it returns None; then `tokens`, `stopped` and `score` hold the answer."""

    def __init__(self, num_beams: int, max_new_tokens: int, stop_ids: Iterable[int],
                 length_penalty: float = LENGTH_PENALTY):
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"num_beams {num_beams} and max_new_tokens {max_new_tokens} must be >= 1")
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.length_penalty = float(length_penalty)
        self.beams_to_keep = max(2, 1 + len(self.stop_ids)) * num_beams
        self.running: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (tokens, sum of log-probs)
        self.finished: list[tuple[float, tuple[int, ...], bool]] = []  # (normalised score, tokens, stopped)
        self.length = 0  # tokens in every running beam
        self.done = False

    def step(self, logits: np.ndarray) -> list[tuple[int, int]] | None:
        """logits: [len(running), n_vocab]. Returns the next running beams as (index of the parent in the current
        running list, new token), best first; None when the search is over."""
        if self.done:
            raise RuntimeError("the beam search is over")
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != len(self.running):
            raise ValueError(f"expected logits for {len(self.running)} beams, got shape {logits.shape}")
        k = self.beams_to_keep
        scores = log_softmax_rows(logits) + np.asarray([s for _, s in self.running])[:, None]
        flat = scores.reshape(-1)
        n_vocab = scores.shape[1]
        top = np.argpartition(-flat, k - 1)[:k] if flat.size > k else np.arange(flat.size)
        # torch.topk leaves the order of ties open; here the lower flat index (beam, then token) goes first.
        top = top[np.lexsort((top, -flat[top]))]
        length = self.length + 1
        at_max = length >= self.max_new_tokens
        norm = length ** self.length_penalty
        chosen: list[tuple[int, int]] = []
        new_running: list[tuple[tuple[int, ...], float]] = []
        for rank, index in enumerate(top):
            parent, token = divmod(int(index), n_vocab)
            score = float(flat[index])
            tokens = self.running[parent][0]
            stop = token in self.stop_ids
            if stop or at_max:
                if rank < self.num_beams:
                    self.finished.append((score / norm, tokens if stop else tokens + (token,), stop))
            elif len(chosen) < self.num_beams:
                chosen.append((parent, token))
                new_running.append((tokens + (token,), score))
        # Stable sort: an earlier hypothesis stays ahead of a later one with the same score (torch.cat order).
        self.finished.sort(key=lambda h: -h[0])
        del self.finished[self.num_beams:]
        self.length = length
        self.running = new_running
        if at_max or not new_running:
            self.done = True
        elif len(self.finished) == self.num_beams:
            best_possible = new_running[0][1] / norm
            if not best_possible > self.finished[-1][0]:
                self.done = True
        return None if self.done else chosen

    def _best(self) -> tuple[float, tuple[int, ...], bool]:
        if not self.done:
            raise RuntimeError("the beam search is still running")
        return self.finished[0]

    @property
    def tokens(self) -> tuple[int, ...]:
        return self._best()[1]

    @property
    def stopped(self) -> bool:
        return self._best()[2]

    @property
    def score(self) -> float:
        """The answer's sum of log-probabilities / length ** length_penalty."""
        return self._best()[0]


__all__ = ["LENGTH_PENALTY", "BeamSearch", "log_softmax_rows"]
