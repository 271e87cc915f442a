"""Workstation side, language: the Llama backbone (+ NatureLM LoRA) to GGUF, llama.cpp quantization, quality report.

Needs the `export` extra. Never imported by the device path.
"""
