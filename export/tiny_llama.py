"""Seeded random-weight stand-ins for meta-llama/Llama-3.1-8B-Instruct.

No weights can be downloaded here, so every test of the language side runs on a Hugging Face Llama directory written by
this module: the same file set, key names, dtypes, config fields, special-token ids and tokenizer construction as the
real release, only small and random. Anything that loads, converts or quantizes the real directory (transformers,
llama.cpp's converter, our GGUF code) then meets the same shapes of data it meets in production.

Two presets:

* ``tiny``: a few hundred thousand parameters; builds in well under a second. Its vocabulary is a byte-level BPE of
  512 regular tokens (the 256 byte tokens at ids 0..255 plus 256 merges at 256..511) followed by the 256 Llama 3
  special tokens at 512..767.
* ``small``: the shape of Llama-3.2-1B (about 1.5 B parameters, ~3 GB in bfloat16). Its 128000 regular tokens are the
  same 512 trained tokens followed by unreachable filler tokens, so that the special tokens sit at their real Llama 3
  ids 128000..128255 and code that (wrongly) hard-codes those ids behaves as it would with the real model.

The tokenizer does not depend on the seed: it is trained deterministically from the corpus embedded below. The weights
do, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

#: Llama 3's pre-tokenizer split pattern (tiktoken ``pat_str`` of meta-llama/llama-models, identical in tokenizer.json).
LLAMA3_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

NUM_SPECIAL_TOKENS = 256

#: The Llama 3.1 special tokens in id order (meta-llama/llama-models, models/llama3/tokenizer.py, and the HF release:
#: 128004 is <|finetune_right_pad_id|>, 128005 is still <|reserved_special_token_2|> in 3.1, 128008 <|eom_id|>).
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    _NAMED_SPECIALS
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))]
)

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOM_TOKEN = "<|eom_id|>"
EOT_TOKEN = "<|eot_id|>"

#: Byte tokens plus trained merges: the regular vocabulary the BPE trainer produces for both presets.
TRAINED_VOCAB_SIZE = 512

# Fixed rather than read from the installed transformers, so that the files stay byte-identical across environments.
_TRANSFORMERS_VERSION_FIELD = "4.57.0"
_MODEL_MAX_LENGTH = 131072


@dataclass(frozen=True)
class LlamaPreset:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    #: Regular (non-special) tokens; the special tokens follow them.
    num_regular_tokens: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.num_regular_tokens + NUM_SPECIAL_TOKENS


PRESETS: dict[str, LlamaPreset] = {
    "tiny": LlamaPreset("tiny", 256, 2, 4, 2, 512, TRAINED_VOCAB_SIZE),
    # Llama-3.2-1B's shape (but untied embeddings, as in Llama-3.1-8B).
    "small": LlamaPreset("small", 2048, 16, 32, 8, 8192, 128000),
}


def get_preset(preset: str) -> LlamaPreset:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown Llama preset {preset!r}; known: {', '.join(sorted(PRESETS))}") from None


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

_SPECIES = [
    "American Crow",
    "American Robin",
    "Northern Cardinal",
    "Blue Jay",
    "Common Raven",
    "House Sparrow",
    "Song Sparrow",
    "Black-capped Chickadee",
    "Carolina Wren",
    "Mourning Dove",
    "Red-winged Blackbird",
    "Great Horned Owl",
    "Barred Owl",
    "Common Loon",
    "Canada Goose",
    "Mallard",
    "Humpback Whale",
    "Sperm Whale",
    "Killer Whale",
    "Bottlenose Dolphin",
    "Common Dolphin",
    "Gray Wolf",
    "Coyote",
    "Domestic Dog",
    "Domestic Cat",
    "White-handed Gibbon",
    "Hainan Gibbon",
    "Zebra Finch",
    "Common Chiffchaff",
    "Eurasian Wren",
    "European Robin",
    "Common Cuckoo",
    "Spring Peeper",
    "American Bullfrog",
    "Field Cricket",
    "Egyptian Fruit Bat",
    "Little Brown Bat",
    "Aedes aegypti",
    "Anopheles gambiae",
    "Corvus brachyrhynchos",
    "Turdus migratorius",
    "Megaptera novaeangliae",
]

_QUESTIONS = [
    "What is the common name for the focal species in the audio? Answer:",
    "What is the scientific name for the focal species in the audio? Answer:",
    "What are the common names for the species in the audio, if any?",
    "Caption the audio.",
    "Caption the audio, using the common name for any animal species.",
    "How many individuals are vocalizing?",
    "What is the life stage of the focal species in the audio?",
    "What is the call type of the focal species in the audio?",
    "What is the family of the focal species in the audio?",
    "What is the genus of the focal species in the audio?",
    "Is the focal species in the audio an adult or a juvenile?",
    "Is this a song or a call?",
]

_PROSE = """\
The audio contains the song of a bird singing from a tree at dawn, with wind and distant traffic in the background.
A group of birds are calling and singing in the forest. The calls are short, loud and repeated.
A frog is calling near a pond at night while insects chirp in the grass.
Whales produce long, low moans and clicks that travel far through the ocean.
A dog is barking and a person is talking in the distance.
The recording has rain, wind, water and a few faint bird calls.
Two individuals are vocalizing: one sings and the other answers with a call.
The bird call is a harsh caw, repeated three times.
The song is a series of clear whistles followed by a rapid trill.
Bats emit ultrasonic echolocation calls while they hunt for insects in the dark.
Mosquitoes make a high pitched buzz with their wings.
Gibbons sing loud duets in the morning; the female song is a great call.
The animal sounds in this clip are the alarm calls of a small songbird.
Life stage: adult. Life stage: juvenile. Life stage: nestling. Call type: song. Call type: call. Call type: alarm.
There are no animal sounds in the audio. There is no bird in the audio.
Species: Corvus, Turdus, Cardinalis, Cyanocitta, Passer, Strix, Bubo, Anas, Branta, Canis, Felis, Rana, Hyla.
Family: Corvidae, Turdidae, Cardinalidae, Passeridae, Strigidae, Anatidae, Canidae, Felidae, Ranidae, Hylidae.
"""


def _training_corpus() -> list[str]:
    """Text for the BPE trainer, in a fixed order.

    It is weighted so that the NatureLM prompts tokenise into multi-byte tokens and so that "Yes", " Yes", "No" and
    " No" become single tokens, which the yes/no scorer relies on (as it can with the real Llama 3 vocabulary).
    """
    lines: list[str] = []
    lines += _PROSE.splitlines()
    for question in _QUESTIONS:
        lines += [question] * 3
    for species in _SPECIES:
        lines.append(f"Is there a {species} in the audio? Answer Yes or No.")
        lines.append(f"Is there an {species} in the audio? Answer Yes or No.")
        lines.append(f"{species}")
        lines.append(f"The focal species is the {species}.")
    # Answers stand alone after "<|end_header_id|>\n\n", so their no-space spelling must be frequent too.
    lines += ["Yes", "No", "Yes.", "No.", "Answer: Yes", "Answer: No"] * 12
    lines += [str(n) for n in range(101)]
    lines += [f"How many individuals are vocalizing? {n}" for n in range(1, 11)]
    # The text around the audio, as the prompt template lays it out ("\n\n" is one token in Llama 3 too).
    for question in _QUESTIONS:
        lines += [f"user\n\n<Audio></Audio> {question}", "assistant\n\n"] * 2
    return lines


def _train_byte_level_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the regular vocabulary: 256 byte tokens (ids 0..255) and 256 merges (ids 256..511)."""
    trainee = Tokenizer(models.BPE())
    trainee.pre_tokenizer = _llama3_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    trainee.train_from_iterator(_training_corpus(), trainer=trainer)
    model = json.loads(trainee.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    if len(vocab) != TRAINED_VOCAB_SIZE:
        raise RuntimeError(
            f"BPE training produced {len(vocab)} tokens, expected {TRAINED_VOCAB_SIZE}: enlarge the corpus"
        )
    if sorted(vocab.values()) != list(range(TRAINED_VOCAB_SIZE)):
        raise RuntimeError("BPE training produced non-contiguous token ids")
    return vocab, merges  # type: ignore[return-value]


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _filler_token(index: int) -> str:
    # A letter followed by a byte-level space ("Ġ") can never lie inside one pre-token of the Llama 3 split pattern,
    # and no merge produces it, so these tokens pad the id space without ever being emitted by the encoder.
    return f"fill\u0120{index:06d}"


def build_tokenizer(preset: str) -> Tokenizer:
    """A Llama-3-style byte-level BPE ``tokenizers.Tokenizer`` for ``preset`` (deterministic; no seed involved)."""
    spec = get_preset(preset)
    vocab, merges = _train_byte_level_bpe()
    if spec.num_regular_tokens < len(vocab):
        raise ValueError(f"preset {preset!r} has fewer regular tokens than the trained vocabulary")
    for index in range(len(vocab), spec.num_regular_tokens):
        filler = _filler_token(index)
        if filler in vocab:
            raise RuntimeError(f"filler token {filler!r} collides with a trained token")
        vocab[filler] = index

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,
        )
    )
    tok.normalizer = None
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens(
        [
            AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for t in LLAMA3_SPECIAL_TOKENS
        ]
    )
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    ids = special_token_ids(tok)
    if ids[BOS_TOKEN] != spec.num_regular_tokens or tok.get_vocab_size(with_added_tokens=True) != spec.vocab_size:
        raise RuntimeError("special tokens did not land right after the regular vocabulary")
    for word in ("Yes", " Yes", "No", " No"):
        if len(tok.encode(word, add_special_tokens=False).ids) != 1:
            raise RuntimeError(f"{word!r} is not a single token: adjust the training corpus")
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of all 256 Llama 3 special tokens, keyed by token text, read from ``tokenizer``.

    Accepts a ``tokenizers.Tokenizer`` or a transformers tokenizer, so tests can compare what each one declares.
    """
    if isinstance(tokenizer, Tokenizer):
        lookup = tokenizer.token_to_id
    else:
        vocab = tokenizer.get_vocab()
        lookup = vocab.get
    out: dict[str, int] = {}
    for token in LLAMA3_SPECIAL_TOKENS:
        token_id = lookup(token)
        if token_id is None:
            raise KeyError(f"special token {token} is missing from the tokenizer")
        out[token] = int(token_id)
    return out


_CHAT_TEMPLATE = (
    # A simplified Llama 3.1 template (no tool calling): default system header with the knowledge-cutoff lines, each
    # turn as <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>. NatureLM does not use it.
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def _added_token_entry(content: str, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, obj: dict) -> None:
    # Insertion order is fixed by the code, so no sort_keys: it keeps numeric id keys in numeric order.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir: Path, preset: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (no weights; cheap for any preset)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(preset)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    ids = special_token_ids(tok)
    tokenizer_config = {
        "added_tokens_decoder": {str(ids[t]): _added_token_entry(t) for t in LLAMA3_SPECIAL_TOKENS},
        "bos_token": BOS_TOKEN,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        # The Instruct release ends turns with <|eot_id|>, so that is its eos_token (the base model's is end_of_text).
        "eos_token": EOT_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": _MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    special_tokens_map = {
        "bos_token": {k: v for k, v in _added_token_entry(BOS_TOKEN).items() if k != "special"},
        "eos_token": {k: v for k, v in _added_token_entry(EOT_TOKEN).items() if k != "special"},
    }
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)


# --------------------------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------------------------


def llama_config(preset: str) -> dict:
    """config.json contents, field for field as in Llama-3.1-8B-Instruct's, with the preset's sizes."""
    spec = get_preset(preset)
    bos = spec.num_regular_tokens + LLAMA3_SPECIAL_TOKENS.index(BOS_TOKEN)
    eos = [spec.num_regular_tokens + LLAMA3_SPECIAL_TOKENS.index(t) for t in (END_OF_TEXT_TOKEN, EOM_TOKEN, EOT_TOKEN)]
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": _TRANSFORMERS_VERSION_FIELD,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }


def generation_config(preset: str) -> dict:
    cfg = llama_config(preset)
    return {
        "bos_token_id": cfg["bos_token_id"],
        "do_sample": True,
        "eos_token_id": cfg["eos_token_id"],
        "temperature": 0.6,
        "top_p": 0.9,
        "transformers_version": _TRANSFORMERS_VERSION_FIELD,
    }


@dataclass(frozen=True)
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    kind: str  # "linear" (std 1/sqrt(fan_in)), "embedding" or "norm"


def _tensor_plan(spec: LlamaPreset) -> list[_TensorPlan]:
    h, kv = spec.hidden_size, spec.num_key_value_heads * spec.head_dim
    plan = [
        _TensorPlan("model.embed_tokens.weight", (spec.vocab_size, h), "embedding"),
        _TensorPlan("model.norm.weight", (h,), "norm"),
        _TensorPlan("lm_head.weight", (spec.vocab_size, h), "linear"),
    ]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        plan += [
            _TensorPlan(p + "input_layernorm.weight", (h,), "norm"),
            _TensorPlan(p + "post_attention_layernorm.weight", (h,), "norm"),
            _TensorPlan(p + "self_attn.q_proj.weight", (h, h), "linear"),
            _TensorPlan(p + "self_attn.k_proj.weight", (kv, h), "linear"),
            _TensorPlan(p + "self_attn.v_proj.weight", (kv, h), "linear"),
            _TensorPlan(p + "self_attn.o_proj.weight", (h, h), "linear"),
            _TensorPlan(p + "mlp.gate_proj.weight", (spec.intermediate_size, h), "linear"),
            _TensorPlan(p + "mlp.up_proj.weight", (spec.intermediate_size, h), "linear"),
            _TensorPlan(p + "mlp.down_proj.weight", (h, spec.intermediate_size), "linear"),
        ]
    return sorted(plan, key=lambda t: t.name)


def _tensor_seed(seed: int, name: str) -> int:
    # One generator per tensor, keyed by name: a tensor's values do not depend on which others exist or on the order
    # they are made in, so adding a tensor later does not reshuffle every other one.
    digest = hashlib.sha256(f"naturelm-edge tiny llama/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _make_tensor(plan: _TensorPlan, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, plan.name))
    noise = torch.randn(plan.shape, generator=gen, dtype=torch.float32)
    if plan.kind == "norm":
        # Not all ones, so that a runtime that drops or misplaces a norm weight produces different numbers.
        values = 1.0 + 0.1 * noise
    elif plan.kind == "embedding":
        # Unit scale, like the normalised hidden states the layers see; the first RMSNorm removes the scale anyway,
        # but the residual stream keeps it, and a 0.02-scale embedding would be drowned by the first layer's output.
        values = noise
    else:
        # 1/sqrt(fan_in) keeps each projection's output at the scale of its (normalised) input through every layer.
        values = noise / (plan.shape[1] ** 0.5)
    return values.to(torch.bfloat16)


def _write_safetensors(path: Path, plans: list[_TensorPlan], seed: int) -> None:
    """Stream tensors into a safetensors file one at a time (the ``small`` preset is ~3 GB).

    The header is compact JSON with sorted keys, padded with spaces to 8 bytes as the safetensors library does, and the
    data follow in header order, so equal inputs give equal bytes.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer does not byte-swap")
    header: dict[str, dict] = {}
    offset = 0
    for plan in plans:
        nbytes = 2 * _numel(plan.shape)
        header[plan.name] = {"dtype": "BF16", "shape": list(plan.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_obj = {"__metadata__": {"format": "pt"}, **header}
    header_bytes = json.dumps(header_obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for plan in plans:
            t = _make_tensor(plan, seed).contiguous()
            f.write(t.view(torch.int16).numpy().tobytes())
    tmp.replace(path)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_llama_dir(out_dir: Path, preset: str, seed: int) -> None:
    """Write a random, seeded Hugging Face Llama 3.1 Instruct-style directory for ``preset`` into ``out_dir``.

    Files: config.json, generation_config.json, model.safetensors (bfloat16, real HF key names), tokenizer.json,
    tokenizer_config.json, special_tokens_map.json. Equal (preset, seed) give byte-identical files.
    """
    spec = get_preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("writing %s Llama (seed %d) to %s", preset, seed, out_dir)
    _write_json(out_dir / "config.json", llama_config(preset))
    _write_json(out_dir / "generation_config.json", generation_config(preset))
    write_tokenizer_files(out_dir, preset)
    _write_safetensors(out_dir / "model.safetensors", _tensor_plan(spec), seed)
