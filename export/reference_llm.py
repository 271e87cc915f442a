"""The language half of the NatureLM-audio reference pipeline, written plainly: the oracle for GGUF/llama.cpp parity.

It reproduces what ``NatureLM/models/NatureLM.py`` (v1.0.2) does on the Llama side, in float32 on the CPU:

* the tokenizer gets a ``[PAD]`` special token (vocabulary + 1) and the model's ``embed_tokens`` and ``lm_head`` are
  resized to match;
* the LoRA on q/k/v/o_proj is merged in place, scaled by ``merging_alpha``: W' = W + merging_alpha * (alpha / r) * B @ A;
* the prompt is BOS (embedded by hand) + the text before the audio + the audio embeddings + the text after the audio,
  each text piece tokenised on its own with no special tokens added (``NatureLM.prompt_wrap``);
* decoding is greedy (``generate``) or transformers' own beam search as upstream calls it (``generate_beam``).

It is meant to be obviously right rather than fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

from edge.errors import CheckpointError
from edge.spec import PROMPT

logger = logging.getLogger(__name__)

#: The reference's audio placeholder (NatureLMAudioProcessor.audio_token_placeholder without its trailing space).
AUDIO_PLACEHOLDER = "<AudioHere>"
PAD_TOKEN = "[PAD]"

LoraWeights = Mapping[str, "tuple[torch.Tensor, torch.Tensor]"]


def _float32_dtype_kwarg() -> dict:
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype (the old name warns); older releases only know
    # torch_dtype, and pyproject allows them.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}


class ReferenceLLM:
    """Llama-3.1-8B-Instruct (or a stand-in from ``export.tiny_llama``) with NatureLM's LoRA, PAD row and prompt.

    Args:
        llama_dir: a Hugging Face Llama directory.
        lora: HF module name (``"model.layers.3.self_attn.q_proj"``) -> ``(A [r, in], B [out, r])``; None for none.
        lora_alpha, lora_rank: the PEFT ``lora_alpha`` and ``r``; the LoRA scale is ``lora_alpha / lora_rank``.
        merging_alpha: extra scale on the LoRA at inference (NatureLM's knob; 1.0 = as trained).
        resized_rows: optional ``{"embed_tokens": [V+1, H], "lm_head": [V+1, H]}`` full matrices, for a NatureLM
            checkpoint that carries the resized embeddings; they replace the resized matrices wholesale.
    """

    def __init__(
        self,
        llama_dir: Path,
        lora: LoraWeights | None,
        lora_alpha: float,
        lora_rank: int,
        merging_alpha: float = 1.0,
        resized_rows: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.llama_dir = Path(llama_dir)
        self.lora_alpha = float(lora_alpha)
        self.lora_rank = int(lora_rank)
        self.merging_alpha = float(merging_alpha)
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {lora_rank}")

        logger.info("loading reference Llama from %s", self.llama_dir)
        # The reference asks for use_fast=False, but Llama 3 has no slow tokenizer, so transformers gives the fast one.
        self.tokenizer = AutoTokenizer.from_pretrained(self.llama_dir)
        self.tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        self.model = LlamaForCausalLM.from_pretrained(
            self.llama_dir, attn_implementation="eager", **_float32_dtype_kwarg()
        )
        self.model.eval()
        self.model.requires_grad_(False)
        self._resize_for_pad(resized_rows)
        if lora:
            self._merge_lora(lora)

        self.bos_id = self._token_id(PROMPT.bos)
        self.stop_ids: tuple[int, ...] = tuple(self._token_id(t) for t in PROMPT.stop_tokens)
        self.pad_id = self._token_id(PAD_TOKEN)

    # ----------------------------------------------------------------------------------------------------------------
    # Construction

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise CheckpointError(f"token {token!r} is not in the tokenizer of {self.llama_dir}")
        return int(token_id)

    @torch.no_grad()
    def _resize_for_pad(self, resized_rows: Mapping[str, torch.Tensor] | None) -> None:
        """Grow embed_tokens and lm_head by the [PAD] row(s) as the reference does, but deterministically.

        transformers (>= 4.46) fills new rows with the mean of the old ones plus noise drawn from the global RNG with
        1e-9 times their covariance; here they are the exact mean, i.e. the same values without the noise, so the
        oracle does not depend on RNG state. (Older transformers, which the reference may have been trained with,
        drew them from N(0, 0.02): if the real checkpoint carries the rows, pass them as ``resized_rows``.)
        """
        old_vocab = self.model.get_input_embeddings().weight.shape[0]
        new_vocab = len(self.tokenizer)
        if new_vocab < old_vocab:
            raise CheckpointError(f"tokenizer has {new_vocab} tokens but the model has {old_vocab} embedding rows")
        if new_vocab > old_vocab:
            embed_mean = self.model.get_input_embeddings().weight.mean(dim=0)
            head_mean = self.model.get_output_embeddings().weight.mean(dim=0)
            self.model.resize_token_embeddings(new_vocab, mean_resizing=False)
            self.model.get_input_embeddings().weight[old_vocab:] = embed_mean
            self.model.get_output_embeddings().weight[old_vocab:] = head_mean
        if resized_rows:
            unknown = sorted(set(resized_rows) - {"embed_tokens", "lm_head"})
            if unknown:
                raise CheckpointError(f"resized_rows has unknown entries {unknown}; expected embed_tokens, lm_head")
            targets = {
                "embed_tokens": self.model.get_input_embeddings().weight,
                "lm_head": self.model.get_output_embeddings().weight,
            }
            for name, matrix in resized_rows.items():
                target = targets[name]
                if tuple(matrix.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"resized_rows[{name!r}] has shape {tuple(matrix.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(matrix.to(torch.float32))

    @torch.no_grad()
    def _merge_lora(self, lora: LoraWeights) -> None:
        scale = self.merging_alpha * self.lora_alpha / self.lora_rank
        for name in sorted(lora):
            a, b = lora[name]
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"LoRA target {name!r} is not a module of the Llama model") from None
            if not isinstance(module, torch.nn.Linear):
                raise CheckpointError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear layer")
            out_f, in_f = module.weight.shape
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"LoRA {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a [{out_f}, {in_f}] weight"
                )
            if a.shape[0] != self.lora_rank:
                raise CheckpointError(f"LoRA {name!r} has rank {a.shape[0]} but lora_rank is {self.lora_rank}")
            # float64 product so the merged weight is W + delta rounded once, whatever order the terms come in.
            delta = scale * (b.to(torch.float64) @ a.to(torch.float64))
            module.weight.copy_((module.weight.to(torch.float64) + delta).to(module.weight.dtype))
        logger.info("merged %d LoRA layers at scale %g", len(lora), scale)

    # ----------------------------------------------------------------------------------------------------------------
    # Prompt

    @staticmethod
    def prompt_texts(question: str) -> tuple[str, str]:
        """The two text pieces around the audio, exactly as the reference builds them.

        The reference (NatureLMAudioProcessor.prepare_instruction, then NatureLM.prompt_wrap) does::

            instruction = "<Audio><AudioHere></Audio> " + question
            prompt = "<|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|><|start_header_id|>assistant"
                     "<|end_header_id|>\\n\\n".format(prompt=instruction.strip())
            before, after = prompt.split("<AudioHere>")

        so ``before`` = ``"<|start_header_id|>user<|end_header_id|>\\n\\n<Audio>"`` and ``after`` =
        ``("</Audio> " + question).rstrip() + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"``
        (the strip only reaches the question's trailing whitespace, or the space after ``</Audio>`` for an empty
        question). BOS is not part of either: it is embedded by hand in front.
        """
        if AUDIO_PLACEHOLDER in question:
            # The reference would then skip its own placeholder and split the prompt elsewhere.
            raise ValueError(f"question must not contain {AUDIO_PLACEHOLDER!r}: {question!r}")
        before = PROMPT.before_audio
        after = (PROMPT.after_audio + question).rstrip() + PROMPT.after_question
        return before, after

    def prompt_pieces(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the text before and after the audio (no BOS; see ``prompt_texts``)."""
        before, after = self.prompt_texts(question)
        ids_before = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        ids_after = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return list(ids_before), list(ids_after)

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.model.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long))

    def _check_audio(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.model.config.hidden_size
        if audio_embeds.ndim != 2 or audio_embeds.shape[1] != hidden:
            raise ValueError(f"audio_embeds must be [n_audio, {hidden}], got {tuple(audio_embeds.shape)}")
        audio = audio_embeds.detach().to(torch.float32)
        if not torch.isfinite(audio).all():
            raise ValueError("audio_embeds contains NaN or infinity")
        return audio

    def prompt_embeds(self, audio_embeds: torch.Tensor, question: str) -> torch.Tensor:
        """[1 + len(before) + n_audio + len(after), hidden]: the sequence the reference feeds the LLM."""
        audio = self._check_audio(audio_embeds)
        ids_before, ids_after = self.prompt_pieces(question)
        with torch.no_grad():
            return torch.cat(
                [self._embed_ids([self.bos_id]), self._embed_ids(ids_before), audio, self._embed_ids(ids_after)],
                dim=0,
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Inference

    @torch.no_grad()
    def logits(self, audio_embeds: torch.Tensor, question: str) -> torch.Tensor:
        """Logits at every position of the prompt: [seq, vocab] float32 (vocab includes [PAD])."""
        embeds = self.prompt_embeds(audio_embeds, question)
        out = self.model(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
        return out.logits[0].to(torch.float32)

    def next_token_logits(self, audio_embeds: torch.Tensor, question: str) -> torch.Tensor:
        """Logits for the first answer token: [vocab]."""
        return self.logits(audio_embeds, question)[-1]

    @torch.no_grad()
    def generate(
        self,
        audio_embeds: torch.Tensor,
        question: str,
        max_new_tokens: int = 300,
        stop_ids: Iterable[int] | None = None,
        use_cache: bool = True,
    ) -> list[int]:
        """Greedy decoding; returns the new token ids, ending with the stop token when one was produced.

        The reference decodes with ``num_beams=2`` (``generate_beam``); greedy is the device's per-prompt option
        (``num_beams: 1``), a function of the logits alone, compared token for token.

        Stops on ``stop_ids``, by default the ids of ``edge.spec.PROMPT.stop_tokens`` read from the tokenizer: the
        generation config's eos list (``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``). (Reference quirk not
        reproduced: NatureLM adds a stopping criterion on token id 2, a leftover from Llama 2's ``</s>`` that in
        Llama 3 is the text "#"; pass ``stop_ids`` to model it. Its ``min_length=1`` is a no-op with
        ``inputs_embeds``.) ``use_cache=False`` recomputes the whole sequence each step, as a cross-check.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = set(self.stop_ids if stop_ids is None else (int(i) for i in stop_ids))
        embeds = self.prompt_embeds(audio_embeds, question)[None]
        out_ids: list[int] = []
        past = None
        step_input = embeds
        for _ in range(max_new_tokens):
            if use_cache:
                out = self.model(inputs_embeds=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
            else:
                out = self.model(inputs_embeds=step_input, use_cache=False)
            next_id = int(torch.argmax(out.logits[0, -1]).item())
            out_ids.append(next_id)
            if next_id in stops:
                break
            next_embed = self._embed_ids([next_id])[None]
            step_input = next_embed if use_cache else torch.cat([step_input, next_embed], dim=1)
        return out_ids

    @torch.no_grad()
    def generate_beam(
        self,
        audio_embeds: torch.Tensor,
        question: str,
        num_beams: int = 2,
        max_new_tokens: int = 300,
        stop_ids: Iterable[int] | None = None,
        length_penalty: float = 1.0,
    ) -> list[int]:
        """transformers' own beam search, called as NatureLM's ``generate`` calls it (``configs/inference.yml``:
        ``num_beams=2, do_sample=False, min_length=1, repetition_penalty=1.0, length_penalty=1.0``, early_stopping at
        its default False), on ``inputs_embeds`` with an all-ones attention mask. Returns the best beam's new token
        ids up to and including its stop token (transformers pads shorter beams; the padding is dropped).

        Stops on ``stop_ids`` (default: as ``generate``), passed as ``eos_token_id``; upstream's extra stopping
        criterion on id 2 is left out (see ``generate``). Float32, not upstream's bfloat16 autocast.
        """
        stops = list(self.stop_ids if stop_ids is None else (int(i) for i in stop_ids))
        embeds = self.prompt_embeds(audio_embeds, question)[None]
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            min_length=1,
            repetition_penalty=1.0,
            length_penalty=length_penalty,
            early_stopping=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
            temperature=None,
            top_p=None,
        )
        ids = [int(i) for i in out[0]]
        for k, token in enumerate(ids):
            if token in stops:
                return ids[: k + 1]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens, as the reference's ``batch_decode(..., skip_special_tokens=True)``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def single_token_id(self, text: str) -> int:
        """The id of ``text`` when the tokenizer encodes it as exactly one token, else a ``ValueError``."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token in {self.llama_dir} (encodes to {ids})")
        return int(ids[0])

    def yes_no_score(self, audio_embeds: torch.Tensor, question: str) -> float:
        """P(Yes) / (P(Yes) + P(No)) for the first answer token.

        Yes and No are the single tokens the tokenizer encodes "Yes" and "No" to, without a leading space, because the
        answer starts right after ``<|end_header_id|>\\n\\n``. The ratio of the two softmax probabilities is the
        sigmoid of the logit difference, so the rest of the vocabulary cancels out.
        """
        yes_id, no_id = self.single_token_id("Yes"), self.single_token_id("No")
        logits = self.next_token_logits(audio_embeds, question).to(torch.float64)
        return float(torch.sigmoid(logits[yes_id] - logits[no_id]).item())

    def label_shares(self, audio_embeds: torch.Tensor, question: str, labels: Sequence[str]) -> np.ndarray:
        """The label kind's scores: log P(label tokens + a stop token | prompt) per label, softmax over the labels
        (float64). Any of the stop tokens may end the label, so their probabilities are summed."""
        totals = []
        with torch.no_grad():
            prompt = self.prompt_embeds(audio_embeds, question)
            table = self.model.get_input_embeddings()
            n = prompt.shape[0]
            for label in labels:
                ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
                x = torch.cat([prompt, table(torch.tensor(ids))])[None]
                logp = torch.log_softmax(self.model(inputs_embeds=x).logits[0].double(), dim=-1)
                total = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(ids))
                total += float(torch.logsumexp(logp[n - 1 + len(ids), list(self.stop_ids)], dim=0))
                totals.append(total)
        return torch.softmax(torch.tensor(totals, dtype=torch.float64), dim=0).numpy()
