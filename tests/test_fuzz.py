"""Fuzzing (hypothesis) of what a user or a device can feed the recorder: the daemon config file, prompt lists, and the
audio front end. The one property: nothing but the project's own errors (edge.errors.NatureLMEdgeError, one line
naming the culprit) ever escapes; no TypeError, OverflowError, MemoryError or a NaN feature out of garbage.

Bounded for the default test run: a fixed number of examples each (derandomized, so a CI run is reproducible; run
with HYPOTHESIS_PROFILE=explore for a longer randomized search), no per-example deadline.
"""

from __future__ import annotations

import math
import os
import string
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge.config import load_config
from edge.errors import AudioError, NatureLMEdgeError
from edge.frontend import AudioFrontEnd
from edge.prompts import parse_prompts
from edge.spec import CLIP_SECONDS, FBANK

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "daemon.yaml"

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                 HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

# --- values a YAML file can hold -------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 10**400, 65535, 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "~", "/", "\x00", "64MiB", "1e999TB", "9" * 400 + "GB", "-1MiB", "20:00-06:00",
                     "25:00-01:00", "../x", "/nonexistent/zone*", "mic", "file", "stdin", "yes_no", "caption"]),
)
yaml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-3, 3), st.booleans(), st.none()), inner,
                    max_size=4)), max_leaves=12)


def _example(tmp_path: Path) -> dict:
    """examples/daemon.yaml as a dict, its machine-specific paths pointed at files that exist here."""
    (tmp_path / "bundle").mkdir(exist_ok=True)
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    text = EXAMPLE.read_text().replace("/opt/naturelm-edge/bundle", str(tmp_path / "bundle")).replace(
        "/etc/naturelm-edge/ca.crt", str(tmp_path / "ca.crt")).replace("/var/lib/naturelm-edge", str(tmp_path / "st"))
    return yaml.safe_load(text)


def _paths(node, prefix=()):
    """Every key path of a nested structure (dict keys and list indices)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, path, action: str, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    else:
        parent[last] = value
    return doc


def _load(tmp_path: Path, text: str):
    p = tmp_path / "daemon.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        return load_config(p, env={})
    except NatureLMEdgeError as e:
        lines = str(e).split("\n")  # every problem, one line each
        for line in lines:
            assert line.startswith(str(p)) and line.strip() != str(p) + ":", repr(str(e))  # each names the file
        return None


@settings(settings.get_profile(PROFILE))
@given(data=st.data())
def test_fuzz_mutations_of_the_example_config(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("cfg")
    doc = _example(tmp_path)
    paths = list(_paths(doc))
    edits = data.draw(st.integers(1, 3))
    for _ in range(edits):
        paths = list(_paths(doc)) if isinstance(doc, (dict, list)) else [()]
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "add"] if path else ["replace"]))
        doc = _mutate(doc, path, action, data.draw(yaml_values))
    _load(tmp_path, yaml.safe_dump(doc, allow_unicode=True))


@settings(settings.get_profile(PROFILE))
@given(doc=yaml_values)
def test_fuzz_random_config_documents(tmp_path_factory, doc):
    _load(tmp_path_factory.mktemp("cfg"), yaml.safe_dump(doc, allow_unicode=True))


@settings(settings.get_profile(PROFILE))
@given(text=st.one_of(st.text(max_size=200),
                      st.text(alphabet=string.printable, max_size=200),
                      st.sampled_from(["[" * 5000, "{a: " * 3000, "a: " + "9" * 5000, "a: !!python/object:os.system x",
                                       "a: &x [*x]", "\ufeffdevice_id: x", "a: 0x" + "f" * 5000, "? [a, b]\n: c"])))
def test_fuzz_config_text(tmp_path_factory, text):
    _load(tmp_path_factory.mktemp("cfg"), text)


def test_config_loader_regressions(tmp_path):
    """Found by the fuzzer: each used to raise something other than a ConfigError."""
    base = _example(tmp_path)
    for doc, fragment in (
        ({**base, "health": {"interval_s": 10**400}}, "health.interval_s: must be a number"),
        ({**base, "outbox": {"max_bytes": "9" * 400 + "GB"}}, "outbox.max_bytes: must be a positive size"),
        ({**base, "prompts": [{"id": "a", "kind": "open", "text": "x", 1: 2, "z": 3}]}, "prompts[0].1: unknown key"),
    ):
        with pytest.raises(NatureLMEdgeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_config(_write(tmp_path, yaml.safe_dump(doc)), env={})
    for text, fragment in (("a: " + "9" * 5000, "not valid YAML"), ("[" * 5000, "not valid YAML")):
        with pytest.raises(NatureLMEdgeError, match=fragment):
            load_config(_write(tmp_path, text), env={})


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "daemon.yaml"
    p.write_text(text)
    return p


# --- prompt lists -----------------------------------------------------------------------------------------------------

VALID_PROMPT = {"id": "owl", "kind": "yes_no", "text": "Is there an owl? Answer yes or no.", "threshold": 0.6,
                "every_n_windows": 2, "priority": 5, "active_hours": ["20:00-06:00"]}


@settings(settings.get_profile(PROFILE))
@given(items=yaml_values, mutation=st.dictionaries(st.sampled_from(sorted(VALID_PROMPT) + ["labels", "max_tokens",
                                                                                          "x"]), yaml_values,
                                                   max_size=3))
def test_fuzz_prompt_lists(items, mutation):
    for candidate in (items, [items], [{**VALID_PROMPT, **mutation}], [VALID_PROMPT, {**VALID_PROMPT, **mutation}]):
        try:
            prompts = parse_prompts(candidate, "p.yaml", "prompts")
        except NatureLMEdgeError as e:
            assert all(line.startswith("p.yaml: prompts") for line in str(e).split("\n")), str(e)
            continue
        for p in prompts:  # what parsed is usable
            hash(p)
            assert isinstance(p.priority, int) and p.due(0)
            for start, end in p.active_hours:
                assert 0 <= start < 1440 and 0 < end <= 1440


# --- the audio front end -----------------------------------------------------------------------------------------

FRONTEND = AudioFrontEnd(FBANK, CLIP_SECONDS)
# Weighted towards what a recorder meets (float32, int16 PCM at common rates), so that most examples get through to
# the features; the rest is everything else numpy can hold.
COMMON_DTYPES = st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.float16, np.uint8])
ODD_DTYPES = st.sampled_from([np.longdouble, np.int8, np.int64, np.uint16, np.uint32, np.bool_, np.complex64,
                              np.object_, "datetime64[s]", "timedelta64[ms]"])
COMMON_RATES = st.sampled_from([16000, 8000, 22050, 32000, 44100, 48000, 96000, 384000])
RATES = st.one_of(
    COMMON_RATES, COMMON_RATES, COMMON_RATES,
    st.integers(min_value=1000, max_value=200_000),  # mostly ratios that reduce to nothing small: the per-output path
    st.floats(min_value=1000.0, max_value=1e6),
    st.sampled_from([44101, 16001, 7919, 1, 2, 0, -16000, 1e-300, 1e300, 10**30, 10**400, math.nan, math.inf,
                     44100.5, np.int64(48000), np.float32(32000), True, "16000", None, 2_000_000]),
)


@st.composite
def audio(draw):
    dtype = np.dtype(draw(st.one_of(COMMON_DTYPES, COMMON_DTYPES, ODD_DTYPES)))
    ndim = draw(st.sampled_from([1, 1, 1, 1, 2, 2, 2, 0, 3]))
    long = st.integers(5000, 200_000)
    frames = draw(st.one_of(long, long, long, st.integers(300, 5000), st.integers(0, 64)))
    if ndim == 0:
        shape = ()
    elif ndim == 1:
        shape = (frames,)
    elif ndim == 2:
        shape = (frames, draw(st.sampled_from([1, 1, 2, 2, 3, 0])))
    else:
        shape = (draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind in "fc":
        special = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf, 1e-45, 3.4e38, 1e300, -1e308, 0.0]))
        scale = draw(st.sampled_from([0.0, 1e-30, 1e-6, 0.1, 1.0, 1e6, 1e30, 1e300]))
        with np.errstate(all="ignore"):
            x = (rng.standard_normal(shape) * scale).astype(dtype)
            if special is not None and x.size:
                every = draw(st.sampled_from([1, 2, 100]))
                x.reshape(-1)[rng.integers(0, x.size, size=max(1, x.size // every))] = special
        return x
    if dtype.kind in "iub":
        if dtype.kind == "b":
            return rng.integers(0, 2, size=shape).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples + 140)
@given(x=audio(), rate=RATES)
def test_fuzz_audio_front_end(x, rate):
    for name in ("features", "to_model_rate"):
        try:
            out = getattr(FRONTEND, name)(x, rate, name="fuzz.wav")
        except AudioError as e:
            msg = str(e)
            assert "\n" not in msg, msg
            event(f"{name}: AudioError: {msg.replace(' of ' + repr('fuzz.wav'), '').replace(repr('fuzz.wav'), '')[:28]}")
            continue
        event(f"{name}: ok")
        assert out.dtype == np.float32 and np.isfinite(out).all(), (x.dtype, x.shape, rate)
        if name == "features":
            assert out.shape == (1, FRONTEND.num_frames, FBANK.num_mel_bins)
        else:
            assert out.ndim == 1 and out.size >= FRONTEND.min_samples


def test_front_end_regressions():
    """Found by the fuzzer."""
    # A rate whose ratio to 16 kHz reduces to nothing small (44101/16000) made the sinc resampler's polyphase kernel
    # 16000 x 44k floats (2.8 GB): resampy's filter now gathers such a rate's taps per output, in bounded chunks.
    out = FRONTEND.features(np.random.default_rng(0).standard_normal(44101 * 2).astype(np.float32), 44101)
    assert np.isfinite(out).all()
    # Huge but finite float32 samples overflowed to inf in the channel mean and to NaN in the resampler.
    loud = np.full((48000, 2), 3.0e38, dtype=np.float32)
    assert np.isfinite(FRONTEND.features(loud, 48000)).all()
    # An integer rate beyond float's range, and absurd rates, are AudioErrors, not OverflowError / MemoryError.
    for rate in (10**400, 1e-300, 1e300, 0.5):
        with pytest.raises(AudioError, match="sample rate"):
            FRONTEND.features(np.zeros(16000, dtype=np.float32), rate)
    # Samples that are not numbers at all.
    for bad in (np.zeros(16000, dtype="timedelta64[ms]"), np.array([[1, 2], [3]], dtype=object)):
        with pytest.raises(AudioError, match="type"):
            FRONTEND.features(bad, 16000)
