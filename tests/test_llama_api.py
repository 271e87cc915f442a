"""llama.cpp's C API drift: the engine checks every function and struct field it uses at load, spells out "all layers",
and reports llama.cpp's own "offloaded N/M layers"."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from types import SimpleNamespace

import llama_cpp
import llama_cpp.llama_cpp as lib
import pytest

from edge.bundle import load_bundle
from edge.errors import NatureLMEdgeError
from edge.llama_api import FIELDS, FUNCTIONS, MIN_LLAMA_CPP_PYTHON, check_bindings, missing_capabilities
from edge.llm import EngineOptions, LlmEngine, _forward_native_log, model_layer_count, resolve_gpu_layers

ROOT = Path(__file__).resolve().parent.parent


def _copy_of_bindings(**changes):
    """The installed bindings' names in a namespace, with some replaced or (None) removed."""
    names = {n: getattr(lib, n) for n in dir(lib) if n.startswith("llama_")}
    for name, value in changes.items():
        if value is None:
            names.pop(name)
        else:
            names[name] = value
    return SimpleNamespace(**names)


def _struct_without(struct, field: str):
    return type(struct.__name__, (ctypes.Structure,), {"_fields_": [f for f in struct._fields_ if f[0] != field]})


def test_the_installed_bindings_have_everything():
    assert missing_capabilities(lib) == []
    check_bindings(lib, llama_cpp.__version__)
    for struct, fields in FIELDS.items():  # the table names real fields, not attributes ctypes would invent
        assert set(fields) <= {f[0] for f in getattr(lib, struct)._fields_}
    assert set(FUNCTIONS) <= set(dir(lib))


def test_pyproject_floor_is_the_tested_version():
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"llama-cpp-python>=([0-9.]+)', text).group(1)
    assert floor == MIN_LLAMA_CPP_PYTHON
    installed = tuple(int(x) for x in llama_cpp.__version__.split(".")[:3])
    assert installed >= tuple(int(x) for x in floor.split("."))


@pytest.mark.parametrize("change, named", [
    ({"llama_set_adapters_lora": None}, "function llama_set_adapters_lora"),
    ({"llama_memory_seq_cp": None}, "function llama_memory_seq_cp"),
    ({"llama_context_params": _struct_without(lib.llama_context_params, "flash_attn_type")},
     "field llama_context_params.flash_attn_type"),
    ({"llama_context_params": _struct_without(lib.llama_context_params, "kv_unified")},
     "field llama_context_params.kv_unified"),
    ({"llama_model_params": _struct_without(lib.llama_model_params, "vocab_only")},
     "field llama_model_params.vocab_only"),
    ({"llama_batch": None}, "type llama_batch"),
])
def test_a_missing_capability_is_one_clear_error(change, named):
    old = _copy_of_bindings(**change)
    with pytest.raises(NatureLMEdgeError) as e:
        check_bindings(old, "0.3.16")
    msg = str(e.value)
    assert named in msg and "\n" not in msg
    assert msg.startswith("llama-cpp-python 0.3.16 lacks ") and f">= {MIN_LLAMA_CPP_PYTHON}" in msg


def test_a_reshaped_function_is_named():
    """A function that kept its name but not its arguments (llama.cpp renames and reshapes calls)."""
    fn = ctypes.CDLL(None).printf
    fn.argtypes = [ctypes.c_char_p]
    assert missing_capabilities(_copy_of_bindings(llama_set_adapters_lora=fn)) == [
        "function llama_set_adapters_lora with 4 arguments (this build's takes 1)"]


def test_ctypes_would_have_accepted_the_unknown_field_silently():
    """Why _fields_ is read: setting a field a Structure lacks raises nothing."""
    old = _struct_without(lib.llama_context_params, "flash_attn_type")()
    old.flash_attn_type = 1  # no error: a plain Python attribute, never seen by llama.cpp
    assert "flash_attn_type" not in {f[0] for f in type(old)._fields_}


def test_all_layers_is_spelled_out():
    assert resolve_gpu_layers(None, 32, gpu=True) == 33
    assert resolve_gpu_layers(-1, 32, gpu=True) == 33
    assert resolve_gpu_layers(None, 32, gpu=False) == 0
    assert resolve_gpu_layers(10, 32, gpu=True) == 10
    assert resolve_gpu_layers(99, 32, gpu=True) == 33


def test_engine_reports_llama_cpps_offload(tiny_llm_bundle):
    bundle = load_bundle(tiny_llm_bundle)
    path = bundle.file(bundle.section("llm")["models"]["Q8_0"]["file"])
    assert model_layer_count(path) == 2  # the tiny preset's num_hidden_layers
    gpu = bool(lib.llama_supports_gpu_offload())
    with LlmEngine.from_bundle(bundle, EngineOptions(model_type="Q8_0", n_gpu_layers=-1, n_threads=1)) as e:
        assert e.n_layer == 2 and e.n_gpu_layers == (3 if gpu else 0)
        assert e.offload_text == ("3/3" if gpu else "0/3")


def test_the_offload_line_of_llamas_log_is_read():
    from edge import llm

    _forward_native_log(2, b"load_tensors: offloaded 17/33 layers to GPU\n", None)
    assert llm._last_offload == (17, 33)
