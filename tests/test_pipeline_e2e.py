"""The whole device pipeline against the PyTorch reference, and `infer` over real files.

Parity: numpy front end -> ONNX fp32 -> llama.cpp F32 GGUF (F32 KV cache, flash attention off, as the LLM parity
tests) against export.reference.ReferencePipeline on the same tiny weights and the same 16 kHz audio. Tolerances:
audio embeddings 1e-4 relative to their scale (the ONNX graph alone is ~1e-6; the numpy fbank adds ~1e-6);
yes_no scores 1e-4 absolute (the score is a sigmoid of a logit difference whose error is ~1e-5 here); greedy tokens
identical.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import datetime

import jsonschema
import numpy as np
import pytest
import soundfile as sf
import torch

from edge.bundle import load_bundle
from edge.encoder import AudioEncoder
from edge.events import WindowInfo, load_schema
from edge.llm import EngineOptions, LlmEngine
from edge.outputs import events_from_jsonl, raven_selections, read_raven_table
from edge.pipeline import Pipeline
from edge.prompts import parse_prompts
from edge.synth import birdsong

PROMPTS = [
    {"id": "crow", "kind": "yes_no", "text": "Is there a American Crow in the audio? Answer Yes or No."},
    {"id": "caption", "kind": "caption", "text": "Caption the audio.", "max_tokens": 12},
    {"id": "species", "kind": "open", "text": "What is the common name for the focal species in the audio? Answer:",
     "max_tokens": 10},
]


@pytest.fixture(scope="module")
def reference(tiny_model):
    from export.reference import ReferencePipeline

    return ReferencePipeline(*tiny_model)


@pytest.fixture(scope="module")
def device_pipeline(tiny_full_bundle):
    bundle = load_bundle(tiny_full_bundle)
    encoder = AudioEncoder(bundle, precision="fp32", provider="cpu")
    llm = LlmEngine.from_bundle(bundle, EngineOptions(model_type="F32", kv_cache_type="f32", flash_attn=False,
                                                      n_threads=1))
    pipe = Pipeline(bundle, encoder, llm, parse_prompts(PROMPTS, "test"), device_id="test-rec")
    yield pipe
    pipe.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_device_pipeline_matches_the_reference(device_pipeline, reference, seed):
    audio = birdsong(10.0, 16000, seed=seed)
    noise = np.random.default_rng(seed).standard_normal(audio.size).astype(np.float32)
    audio = np.clip(audio + 0.05 * seed * noise, -1, 1)

    emb_ref = reference.audio_embeddings(audio, 16000).numpy()
    emb_dev = device_pipeline.encoder.encode(device_pipeline.frontend.features(audio, 16000))[0]
    scale = float(np.abs(emb_ref).max())
    assert np.abs(emb_dev - emb_ref).max() <= 1e-4 * scale

    window = WindowInfo(index=0, offset_s=0.0, duration_s=10.0, start_utc=datetime.now())
    result = device_pipeline.process(audio, 16000, window, source="synthetic")
    by_id = {e.prompt_id: e for e in result.events}
    assert set(by_id) == {"crow", "caption", "species"}

    ref_score = reference.yes_no_score(audio, 16000, PROMPTS[0]["text"])
    assert by_id["crow"].score == pytest.approx(ref_score, abs=1e-4)
    assert by_id["crow"].answer == ("Yes" if ref_score >= 0.5 else "No")

    generated = 0
    for spec in PROMPTS[1:]:
        # upstream's decoding: transformers' beam search with 2 beams (the device's default for caption prompts)
        ref_ids = reference.llm.generate_beam(torch.from_numpy(emb_ref), spec["text"], num_beams=2,
                                              max_new_tokens=spec["max_tokens"])
        ref_ids = [i for i in ref_ids if i not in reference.llm.stop_ids]
        device_pipeline.llm.set_audio(emb_dev)
        from edge.llm import Prompt

        dev = device_pipeline.llm.ask(Prompt(spec["id"], spec["kind"], spec["text"],
                                             max_new_tokens=spec["max_tokens"]))
        assert list(dev.token_ids) == ref_ids, spec["id"]
        generated += len(ref_ids)
        assert by_id[spec["id"]].answer == reference.llm.decode(ref_ids).strip()
        assert by_id[spec["id"]].to_dict()["decoding"] == {"method": "beam", "num_beams": 2}
    assert generated >= 5  # the comparison covered real multi-token answers, not two empty ones


def _write(path, seconds, sr, channels=1, seed=0):
    mono = birdsong(seconds, sr, seed=seed)
    data = np.stack([mono, np.roll(mono, 50) * 0.5], axis=1) if channels == 2 else mono
    sf.write(str(path), data, sr)
    return path


def _infer(*args):
    return subprocess.run([sys.executable, "-m", "edge.cli", "infer", "--no-progress", "--provider", "cpu", *args],
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    d = tmp_path_factory.mktemp("recordings")
    long = _write(d / "dawn_chorus.flac", 63.0, 16000)
    stereo = _write(d / "stereo_44k.wav", 12.0, 44100, channels=2, seed=3)
    broken = d / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    prompts = d / "prompts.yaml"
    prompts.write_text(
        "prompts:\n"
        "  - {id: bird, kind: yes_no, text: 'Is there a bird in the audio? Answer Yes or No.', threshold: 0.5}\n"
        "  - {id: caption, kind: caption, text: Caption the audio., max_tokens: 6, every_n_windows: 4}\n"
    )
    return {"long": long, "stereo": stereo, "broken": broken, "prompts": prompts, "dir": d}


@pytest.fixture(scope="module")
def infer_jsonl(tiny_full_bundle, recordings):
    out = recordings["dir"] / "events.jsonl"
    emb = recordings["dir"] / "embeddings.npz"
    r = _infer("--bundle", str(tiny_full_bundle), "--prompts", str(recordings["prompts"]), "--hop", "5",
               "--format", "jsonl", "--out", str(out), "--embeddings", str(emb),
               str(recordings["long"]), str(recordings["broken"]), str(recordings["stereo"]))
    return r, events_from_jsonl(out.read_text()), np.load(emb)


def test_long_recording_windows_and_timestamps(infer_jsonl, recordings):
    _, events, _ = infer_jsonl
    long = [e for e in events if e["source"] == str(recordings["long"])]
    windows = sorted({(e["window"]["index"], e["window"]["offset_s"], e["window"]["duration_s"]) for e in long})
    assert [w[1] for w in windows] == [5.0 * i for i in range(12)]
    assert [w[0] for w in windows] == list(range(12))
    assert [w[2] for w in windows] == [10.0] * 11 + [8.0]  # the tail is padded and processed, not dropped
    bird = sorted((e for e in long if e["prompt_id"] == "bird"), key=lambda e: e["window"]["index"])
    assert len(bird) == 12
    caption = [e["window"]["index"] for e in long if e["prompt_id"] == "caption"]
    assert sorted(caption) == [0, 4, 8]  # every_n_windows: 4
    starts = [datetime.fromisoformat(e["window"]["start"].replace("Z", "+00:00")) for e in bird]
    assert all(abs((b - a).total_seconds() - 5.0) < 1e-3 for a, b in itertools.pairwise(starts))
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_every_event_validates_against_the_schema(infer_jsonl):
    _, events, _ = infer_jsonl
    validator = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
    assert events
    for e in events:
        validator.validate(e)
    assert {e["kind"] for e in events} == {"yes_no", "caption"}


def test_stereo_44k_file_and_the_broken_one(infer_jsonl, recordings):
    r, events, _ = infer_jsonl
    stereo = [e for e in events if e["source"] == str(recordings["stereo"])]
    assert sorted({e["window"]["offset_s"] for e in stereo}) == [0.0, 5.0]  # 12 s: [0, 10) and the tail [5, 12)
    assert {e["window"]["duration_s"] for e in stereo} == {10.0, 7.0}
    assert r.returncode == 1  # one file failed, the others were processed
    errors = [line for line in r.stderr.splitlines() if "broken.wav" in line]
    assert any("not a readable audio file" in line for line in errors), r.stderr
    assert "Traceback" not in r.stderr


def test_embeddings_file_reads_back(infer_jsonl, tiny_full_bundle):
    _, _, emb = infer_jsonl
    width = json.loads((tiny_full_bundle / "manifest.json").read_text())["audio"]["embedding_width"]
    assert emb["embeddings"].shape == (12 + 2, width)
    assert emb["embeddings"].dtype == np.float32 and np.isfinite(emb["embeddings"]).all()
    assert list(emb["start_s"][:12]) == [5.0 * i for i in range(12)]
    assert emb["end_s"][11] == pytest.approx(63.0)
    assert len(set(emb["source"])) == 2


def test_raven_table_reads_back(tiny_full_bundle, recordings, tmp_path):
    out = tmp_path / "sel.txt"
    jsonl = tmp_path / "ev.jsonl"
    args = ("--bundle", str(tiny_full_bundle), "--prompts", str(recordings["prompts"]), "--hop", "5")
    r = _infer(*args, "--format", "raven", "--out", str(out), str(recordings["long"]))
    assert r.returncode == 0, r.stderr
    _infer(*args, "--format", "jsonl", "--out", str(jsonl), str(recordings["long"]))
    rows = read_raven_table(out)
    assert rows, "no selections"
    assert list(rows[0])[:7] == ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                                 "High Freq (Hz)"]
    # the table is the merged form of the same run's events
    from edge.events import Event

    events = [Event(device_id=e["device_id"], source=e["source"],
                    window=WindowInfo(e["window"]["index"], e["window"]["offset_s"], e["window"]["duration_s"],
                                      datetime.now()),
                    prompt_id=e["prompt_id"], kind=e["kind"], answer=e["answer"], score=e["score"], model=e["model"],
                    timing_ms={}, positive=e.get("positive"))
              for e in events_from_jsonl(jsonl.read_text())]
    want = raven_selections(events)
    assert len(rows) == len(want)
    for row, sel in zip(rows, want):
        assert float(row["Begin Time (s)"]) == pytest.approx(sel["begin"], abs=1e-3)
        assert float(row["End Time (s)"]) == pytest.approx(sel["end"], abs=1e-3)
        assert row["Prompt"] == sel["prompt"] and row["Answer"] == sel["answer"]
        assert float(row["End Time (s)"]) > float(row["Begin Time (s)"])
    assert [int(r["Selection"]) for r in rows] == list(range(1, len(rows) + 1))


def test_plot(tiny_full_bundle, recordings, tmp_path):
    png = tmp_path / "answers.png"
    r = _infer("--bundle", str(tiny_full_bundle), "--prompts", str(recordings["prompts"]), "--plot", str(png),
               "--out", str(tmp_path / "x.jsonl"), str(recordings["stereo"]))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_tail_shorter_than_the_minimum_never_fails_the_file(tiny_full_bundle, tmp_path):
    # 10.01 s with hop = window: the 10 ms tail used to fail the front end (one fbank frame is 25 ms), exit 1.
    path = _write(tmp_path / "ten_and_a_bit.wav", 10.01, 16000)
    out = tmp_path / "events.jsonl"
    r = _infer("--bundle", str(tiny_full_bundle), "--prompt", "Is there a bird in the audio? Answer Yes or No.",
               "--window", "10", "--hop", "10", "--out", str(out), str(path))
    assert r.returncode == 0, r.stderr
    events = events_from_jsonl(out.read_text())
    assert [(e["window"]["offset_s"], e["window"]["duration_s"]) for e in events] == [(0.0, 10.0)]
    assert "ten_and_a_bit.wav: last 0.010 s not analysed" in r.stderr
