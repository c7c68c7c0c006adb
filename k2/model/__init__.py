"""The K2 model: MLA + MoE decoder (DeepSeek-V3 family), presets up to the real 1T config, HF checkpoint interop.

``from k2.model import ModelConfig, Transformer, load_hf, save_hf`` and ``from k2.model import presets``.
"""

from k2.model import presets
from k2.model.config import ModelConfig
from k2.model.documents import document_layout
from k2.model.hf import load_hf, save_hf
from k2.model.params import count_parameters
from k2.model.transformer import Block, Transformer

__all__ = [
    "Block",
    "ModelConfig",
    "Transformer",
    "count_parameters",
    "document_layout",
    "load_hf",
    "presets",
    "save_hf",
]
