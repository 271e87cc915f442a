"""naturelm-edge device runtime.

Everything under this package runs on the field device and must never import torch or transformers
(JetPack images ship neither, and importing torch costs ~1 GB of RAM). A test enforces it.
"""

__version__ = "0.1.0"
