"""Tokenizers: SentencePiece ``.model`` and Hugging Face ``tokenizer.json``, behind one small interface.

This module owns text <-> ids. Every tokenizer exposes what megatron-core's ``GPTDatasetConfig`` reads
(``vocab_size``, ``eod``, ``pad``) plus ``tokenize``, ``detokenize`` and a batched :meth:`tokenize_batch` used by the
preprocessing workers. :func:`build_tokenizer` picks the kind from the file; :func:`train_sentencepiece` trains a
SentencePiece BPE model offline from a sample of C4-format input (``tools/train_tokenizer.py`` wraps it).

``pad`` is a real id only when the model defines a pad piece distinct from ``eod``; otherwise it is ``-1``, the
value megatron-core itself uses for "no pad token", so that GPTDataset never masks real tokens.
No torch import here: the preprocessing path must start fast.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from megatron_bliss.data.config import TokenizerTrainingConfig
from megatron_bliss.data.indexed import file_sha256

logger = logging.getLogger(__name__)

#: SentencePiece BPE, 8,000 ids, trained with :func:`train_sentencepiece` on public-domain and PSF-licensed text
#: (see docs/data.md); the quickstart's and the tests' tokenizer.
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_bpe_8k.model")
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")


class SentencePieceTokenizer:
    """A SentencePiece model. ``eod`` is the model's ``</s>`` (eos) id.

    Args:
        path: a SentencePiece ``.model`` file.
    """

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{path}: SentencePiece model has no eos piece to use as end-of-document")
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 and pad != self.eod else -1
        self.bos = self._sp.bos_id()
        # megatron-core datasets hash this into their cache keys (as its own MegatronTokenizer does)
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [path]}

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of many texts at once, one ``int32`` array each (one C++ call; no per-id Python objects)."""
        return self._sp.encode(list(texts), return_type="numpy", num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (eod and other control ids are dropped)."""
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model from a ``tokenizer.json``.

    Args:
        path: the ``tokenizer.json`` file.
        eod_token: the end-of-document token's text; by default the first of ``<|endoftext|>``, ``</s>``, ``<eos>``,
            ``<|end_of_text|>``, ``<|eot_id|>``, ``[SEP]`` that the vocabulary has.
    """

    kind = "huggingface"

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else _EOD_CANDIDATES
        eod = next((self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None)
        if eod is None:
            raise ValueError(f"{path}: no end-of-document token among {list(candidates)}; pass eod_token=")
        self.eod = eod
        pad = next((self._tok.token_to_id(t) for t in _PAD_CANDIDATES if self._tok.token_to_id(t) is not None), -1)
        self.pad = pad if pad != self.eod else -1
        self.bos = -1
        # megatron-core datasets hash this into their cache keys (as its own MegatronTokenizer does)
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [path]}

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of many texts at once, one ``int32`` array each."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(path: str, eod_token: str | None = None) -> SentencePieceTokenizer | HFTokenizer:
    """Loads a tokenizer, choosing the kind from the file.

    A ``.json`` file (or a directory holding ``tokenizer.json``) is a Hugging Face tokenizer; anything else is read
    as a SentencePiece model.

    Args:
        path: a SentencePiece ``.model``, a ``tokenizer.json``, or a directory containing ``tokenizer.json``.
        eod_token: Hugging Face only: the end-of-document token text.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: the file is neither kind, naming it.
    """
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path!r}: no such file")
    with open(path, "rb") as f:
        starts_json = f.read(64).lstrip().startswith(b"{")
    try:
        if path.endswith(".json") or starts_json:
            return HFTokenizer(path, eod_token)
        return SentencePieceTokenizer(path)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - both libraries raise bare RuntimeError/Exception on bad files
        raise ValueError(f"tokenizer {path!r}: cannot be loaded as SentencePiece or tokenizer.json ({exc})") from exc


def tokenizer_info(tokenizer: SentencePieceTokenizer | HFTokenizer) -> dict:
    """What the manifest records about a tokenizer: path, kind, SHA-256, vocab size, eod and pad ids."""
    return {"path": tokenizer.path, "kind": tokenizer.kind, "sha256": file_sha256(tokenizer.path),
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod, "pad": tokenizer.pad}


def sample_texts(inputs: list[str], num_docs: int, json_key: str = TokenizerTrainingConfig.json_key,
                 seed: int = TokenizerTrainingConfig.seed) -> list[str]:
    """A seeded reservoir sample of document texts from C4-format inputs (bad lines are skipped).

    Args:
        inputs: JSON-lines files (plain or ``.gz``).
        num_docs: documents to keep.
        json_key: field holding the text.
        seed: sampling seed.

    Returns:
        Up to ``num_docs`` texts.
    """
    from megatron_bliss.data.sources import parse_lines, read_line_chunks

    rng, reservoir, seen = random.Random(seed), [], 0
    for path in inputs:
        for first_line, blob, _ in read_line_chunks(path):
            for text in parse_lines(blob, first_line, json_key).texts:
                seen += 1
                if len(reservoir) < num_docs:
                    reservoir.append(text)
                elif (j := rng.randrange(seen)) < num_docs:
                    reservoir[j] = text
    return reservoir


def train_sentencepiece(inputs: list[str], model_prefix: str, vocab_size: int = TokenizerTrainingConfig.vocab_size,
                        num_docs: int = TokenizerTrainingConfig.num_docs,
                        json_key: str = TokenizerTrainingConfig.json_key, seed: int = TokenizerTrainingConfig.seed,
                        num_threads: int = TokenizerTrainingConfig.threads) -> str:
    """Trains a SentencePiece BPE model offline from a sample of C4-format documents.

    Settings aim at exact round trips: identity normalization, whitespace kept as is, byte fallback for unseen
    characters, ``"\\n"`` as its own piece (training input is line-based, so newlines would otherwise never be
    seen). Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (end of document), ``<pad>`` 3.

    Defaults are those of :class:`~megatron_bliss.data.config.TokenizerTrainingConfig` (``tools/train_tokenizer.py``).

    Args:
        inputs: JSON-lines files to sample from.
        model_prefix: output path without suffix; writes ``MODEL_PREFIX.model`` and ``.vocab``.
        vocab_size: vocabulary size.
        num_docs: documents sampled for training.
        json_key: field holding the text.
        seed: sampling seed.
        num_threads: trainer threads.

    Returns:
        The ``.model`` path.
    """
    import sentencepiece as spm

    texts = sample_texts(inputs, num_docs, json_key, seed)
    if not texts:
        raise ValueError(f"no usable documents in {inputs}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    f.write(line + "\n")
        sample_path = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=sample_path, model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, user_defined_symbols=["\n"], split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000, num_threads=num_threads, minloglevel=2,
            max_sentence_length=16384, train_extremely_large_corpus=False)
    finally:
        os.remove(sample_path)
    logger.info("trained %s.model (vocab %d) on %d documents", model_prefix, vocab_size, len(texts))
    return model_prefix + ".model"
