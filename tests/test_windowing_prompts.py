"""Windowing of long recordings, the activity gate, and prompt-list validation."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.prompts import load_prompts, parse_prompts, single_prompt
from edge.windowing import ActivityGate, Windower, window_count

SR = 16000


@pytest.mark.parametrize("block", [1600, 4096, 16000 * 7, 16000 * 63])
def test_63_s_with_hop_5_gives_12_windows_with_the_padded_tail(block):
    audio = np.arange(63 * SR, dtype=np.float32)
    w = Windower(10, 5, SR)
    got = []
    for i in range(0, audio.size, block):
        got += w.push(audio[i : i + block])
    tail = w.flush()
    assert tail is not None
    got.append(tail)
    assert [start / SR for _, start in got] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]
    assert [s.size / SR for s, _ in got] == [10.0] * 11 + [8.0]
    for samples, start in got:  # every window holds exactly the audio from its start
        np.testing.assert_array_equal(samples, audio[start : start + samples.size])
    assert len(got) == window_count(audio.size, 10 * SR, 5 * SR) == 12
    assert w.flush() is None


def test_short_and_exact_streams():
    w = Windower(10, 5, SR)
    assert w.push(np.zeros(3 * SR)) == []
    samples, start = w.flush()
    assert start == 0 and samples.size == 3 * SR
    w = Windower(10, 10, SR)
    assert len(w.push(np.zeros(20 * SR))) == 2 and w.flush() is None
    assert window_count(20 * SR, 10 * SR, 10 * SR) == 2 and window_count(0, 1, 1) == 0


@pytest.mark.parametrize("hop", [10, 5])
def test_a_last_window_adding_under_half_a_second_is_dropped_and_counted(hop, caplog):
    # 10.01 s with hop = window left a 10 ms tail, shorter than one fbank frame: the whole file failed.
    w = Windower(10, hop, SR, name="rec.wav")
    audio = np.zeros(int(10.01 * SR), dtype=np.float32)
    assert [start for _, start in w.push(audio)] == [0]
    with caplog.at_level("INFO", logger="edge.windowing"):
        assert w.flush() is None
    assert w.tails_dropped == 1 and w.tail_samples_dropped == int(0.01 * SR)
    assert any("rec.wav: last 0.010 s not analysed" in r.getMessage() for r in caplog.records)
    assert window_count(audio.size, 10 * SR, hop * SR, SR // 2) == 1
    # Half a second of new audio is kept; so is a stream shorter than one window, however short.
    w = Windower(10, hop, SR)
    w.push(np.zeros(int(10.5 * SR), dtype=np.float32))
    samples, start = w.flush()
    assert start == hop * SR and samples.size == int(10.5 * SR) - start and w.tails_dropped == 0
    w = Windower(10, hop, SR)
    w.push(np.zeros(100, dtype=np.float32))
    assert w.flush()[0].size == 100 and window_count(100, 10 * SR, hop * SR, SR // 2) == 1


def test_window_count_agrees_with_the_windower():
    rng = np.random.default_rng(0)
    for _ in range(200):
        window = int(rng.integers(10, 400))
        hop = int(rng.integers(1, window + 1))
        min_tail = int(rng.integers(0, window))
        total = int(rng.integers(0, 2000))
        w = Windower(window / SR, hop / SR, SR, min_tail_s=min_tail / SR)
        got = len(w.push(np.zeros(total, dtype=np.float32))) if total else 0
        got += w.flush() is not None
        assert got == window_count(total, window, hop, min_tail), (total, window, hop, min_tail)


def test_hop_longer_than_window_is_refused():
    with pytest.raises(ValueError, match="audio between windows is lost"):
        Windower(5, 10, SR)


def test_gate_counts_skips():
    gate = ActivityGate(threshold_dbfs=-50)
    rng = np.random.default_rng(0)
    assert gate.passes(0.1 * rng.standard_normal(SR))
    assert not gate.passes(1e-5 * rng.standard_normal(SR))
    assert not gate.passes(np.full(SR, 0.5))  # DC is not activity
    assert gate.skipped == 2
    assert ActivityGate(None).passes(np.zeros(10))


def test_prompts_file(tmp_path):
    f = tmp_path / "prompts.yaml"
    f.write_text(
        "prompts:\n"
        "  - {id: crow, kind: yes_no, text: 'Is there a American Crow in the audio? Answer Yes or No.', threshold: 0.7}\n"
        "  - {id: species, kind: label, text: 'What is the common name?', labels: [Crow, Owl]}\n"
        "  - {id: caption, kind: caption, text: Caption the audio., every_n_windows: 6, max_tokens: 30}\n"
        "  - {id: life, kind: open, text: 'What is the life stage?', num_beams: 1}\n"
    )
    prompts = load_prompts(f)
    assert [p.id for p in prompts] == ["crow", "species", "caption", "life"]
    assert prompts[0].threshold == 0.7 and prompts[1].labels == ("Crow", "Owl")
    assert prompts[2].due(12) and not prompts[2].due(13)
    assert prompts[2].num_beams is None and prompts[3].num_beams == 1  # None: the engine's 2 beams, as upstream


@pytest.mark.parametrize(
    "item, message",
    [
        ({"id": "a", "kind": "maybe", "text": "x"}, r"\[0\]\.kind: must be one of"),
        ({"id": "a", "kind": "label", "text": "x", "labels": ["one"]}, r"\[0\]\.labels: a label prompt needs"),
        ({"id": "a", "kind": "yes_no", "text": "x", "threshold": 2}, r"\[0\]\.threshold: must be a number in"),
        ({"id": "a", "kind": "open", "text": "x", "colour": "red"}, r"\[0\]\.colour: unknown key"),
        ({"kind": "open", "text": "x"}, r"\[0\]\.id: missing"),
        ({"id": "a b", "kind": "open", "text": "x"}, r"\[0\]\.id: 'a b' must be"),
        ({"id": "a", "kind": "open", "text": "x", "every_n_windows": 0}, r"every_n_windows: must be an integer"),
        ({"id": "a", "kind": "open", "text": "x", "num_beams": 0}, r"\[0\]\.num_beams: must be an integer in 1\.\.8"),
        ({"id": "a", "kind": "yes_no", "text": "x", "num_beams": 2}, r"\[0\]\.num_beams: only open and caption"),
    ],
)
def test_bad_prompts_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_prompts([item], "p.yaml", "prompts")
    assert str(e.value).startswith("p.yaml: prompts[0]") and "\n" not in str(e.value)


def test_duplicate_ids_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"\[1\]\.id: duplicate prompt id 'a'"):
        parse_prompts([{"id": "a", "kind": "open", "text": "x"}, {"id": "a", "kind": "open", "text": "y"}], "p")
    with pytest.raises(ConfigError, match="prompts file not found"):
        load_prompts(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: [ {id: a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_prompts(bad)


def test_single_prompt_kind():
    assert single_prompt("Is there a crow in the audio? Answer Yes or No.")[0].kind == "yes_no"
    assert single_prompt("Caption the audio.")[0].kind == "open"
