"""Tiny real-text indexed datasets for the pretraining tests.

The text is the Python documentation that ships inside every CPython installation (``pydoc_data.topics``, PSF
license), tokenized as UTF-8 bytes (vocabulary 256, the ``debug`` preset's) and cut into stored sequences of
``seq_length + 1`` tokens with the project's own indexed writer. No tokenizer training, no files from the network.
"""

import numpy as np

from megatron_bliss.data.indexed import IndexedWriter


def text_bytes() -> np.ndarray:
    """The documentation text as a uint8 token array (about 460 kB)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def write_text_dataset(prefix: str, sample_length: int, num_sequences: int, offset: int = 0) -> str:
    """Writes ``num_sequences`` consecutive byte sequences of ``sample_length`` tokens starting at sequence
    ``offset``; returns the prefix."""
    tokens = text_bytes()
    start, stop = offset * sample_length, (offset + num_sequences) * sample_length
    if stop > tokens.size:
        raise ValueError(f"only {tokens.size // sample_length} sequences of {sample_length} bytes available")
    writer = IndexedWriter(prefix, np.uint16)
    writer.add_fixed(tokens[start:stop].astype(np.uint16).reshape(num_sequences, sample_length))
    writer.finalize()
    return prefix


def write_validation_dataset(prefix: str, sample_length: int, num_sequences: int, offset: int) -> str:
    """A validation set of held-out text plus a ``_loss_mask`` companion that scores only each sequence's second
    half (as a continuation-only mask would)."""
    write_text_dataset(prefix, sample_length, num_sequences, offset)
    mask = np.zeros((num_sequences, sample_length), dtype=np.uint8)
    mask[:, sample_length // 2:] = 1
    writer = IndexedWriter(prefix + "_loss_mask", np.uint8)
    writer.add_fixed(mask)
    writer.finalize()
    return prefix
