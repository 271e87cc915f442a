"""Workstation side of naturelm-edge: the PyTorch reference of NatureLM-audio and the ONNX export of its audio side.

Needs the `export` extra (torch, transformers, onnx, ...). Never imported by the device path.
"""
