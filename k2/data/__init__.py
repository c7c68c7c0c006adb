"""Data: tokenizers, the Kimi-K2 chat / tool-call format, the built-in synthetic corpus, file readers, packing, SFT
chat records and the built-in tool-use dialogues.

Submodules: ``k2.data.tokenizer``, ``k2.data.chat``, ``k2.data.corpus``, ``k2.data.readers``, ``k2.data.packing``,
``k2.data.sft``, ``k2.data.toolgen``.
"""

from k2.data import chat, corpus, packing, readers, sft, toolgen
from k2.data.tokenizer import ByteTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "chat",
    "corpus",
    "load_tokenizer",
    "packing",
    "readers",
    "sft",
    "toolgen",
]
