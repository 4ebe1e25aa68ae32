"""The settings of the data stage and of its tools: one dataclass per tool, each field's default and help in one place.

``DataConfig`` covers preprocessing (``tools/preprocess_c4.py``); the others cover ``tools/train_tokenizer.py``,
``tools/prepare_validation.py``, ``tools/select_subset.py`` and ``tools/inspect_indexed.py``. The tools' flags are
generated from these fields (:mod:`megatron_bliss.data.commands`); a field's ``metadata`` may name its flag
(``flag``), its choices (``choices``), whether the command line must give it (``required``), whether it is a
positional argument (``positional``), a mutually exclusive group (``exclusive``) and old flag names that are now an
error naming the new one (``renamed_from``). Checks that concern only one tool's settings live in ``__post_init__``;
checks across concerns (the data's sequence length against the model's) belong to the root config's ``validate()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MODES = ("sequences", "documents")
VALIDATION_FORMATS = ("lambada", "pairs")
SUBSET_METHODS = ("top", "random")


@dataclass
class DataConfig:
    """Settings of ``tools/preprocess_c4.py``: C4 JSON lines or DsDm parquet -> indexed shards + manifest."""

    input: list[str] = field(default_factory=list, metadata={"required": True})
    """Input files, directories or globs (quote globs): C4 JSON lines (``.json``/``.jsonl``, optionally ``.gz``) or
    DsDm parquet."""

    output_prefix: str = field(default="", metadata={"required": True})
    """Output prefix: writes ``PREFIX.bin/.idx`` (or ``PREFIX_shard{K}.bin/.idx``) and ``PREFIX.manifest.json``."""

    tokenizer_model: str | None = None
    """SentencePiece ``.model`` or Hugging Face ``tokenizer.json``; optional only for pre-tokenized parquet input."""

    tokens_per_sequence: int = field(default=1025, metadata={"renamed_from": ("--seq-length",)})
    """Tokens in one stored sequence (``sequences`` mode), which is one training sample and one scored unit. A model
    of ``seq_length`` L reads stored sequences of L+1 tokens (inputs and labels are the sequence shifted by one):
    1025 for L = 1024."""

    mode: str = field(default="sequences", metadata={"choices": MODES})
    """``sequences``: documents+EOD concatenated and cut into pieces of ``tokens_per_sequence`` tokens;
    ``documents``: one entry per document."""

    shards: int = 1
    """Number of disjoint output shards (one per BLISS round); sequences/documents are dealt round-robin."""

    workers: int = 1
    """Tokenizing worker processes (0 tokenizes in the main process); output is identical for any count."""

    json_key: str = "text"
    """JSON field holding a document's text."""

    strict: bool = False
    """Stop at the first bad input line with an error naming ``file:line`` instead of skipping and counting it."""

    append_eod: bool = True
    """Append the tokenizer's end-of-document id to every document."""

    eod_token: str | None = None
    """Hugging Face tokenizers only: text of the end-of-document token, when it is not a usual one."""

    vocab_size: int | None = None
    """Vocabulary size of pre-tokenized parquet input when no tokenizer is given (chooses uint16 or int32)."""

    parquet_column: str = "input_ids"
    """Column of the DsDm parquet files holding each row's token ids."""

    chunk_bytes: int = 1 << 20
    """Bytes of input handed to a worker per task (about 700 C4 documents)."""

    keep_parts: bool = False
    """Keep the per-input tokenized parts after the shards are written (they make a changed rerun cheaper)."""

    progress: bool = True
    """Show a progress bar (docs/s, MB/s) on stderr."""

    overwrite: bool = False
    """Replace an existing output at the prefix made with other settings or inputs (one with the same settings and
    inputs is kept as it is). The old files stay until the new output is complete; then its stale files (extra
    shards, a ``.targets.npy``) are removed."""

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.tokens_per_sequence < 2:
            raise ValueError(f"tokens_per_sequence must be at least 2, got {self.tokens_per_sequence}")
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")

    def to_dict(self) -> dict:
        """The settings as a plain dict (for the manifest)."""
        return asdict(self)


@dataclass
class TokenizerTrainingConfig:
    """Settings of ``tools/train_tokenizer.py``: a SentencePiece BPE model trained offline from C4-format input."""

    input: list[str] = field(default_factory=list, metadata={"required": True})
    """JSON-lines files, directories or globs to sample documents from."""

    model_prefix: str = field(default="", metadata={"required": True})
    """Output path without suffix: writes ``PREFIX.model`` and ``PREFIX.vocab``."""

    vocab_size: int = 32000
    """Vocabulary size."""

    num_docs: int = 20000
    """Documents sampled for training (seeded reservoir sample)."""

    json_key: str = "text"
    """JSON field holding a document's text."""

    seed: int = 0
    """Sampling seed."""

    threads: int = 2
    """SentencePiece trainer threads."""


@dataclass
class ValidationSetConfig:
    """Settings of ``tools/prepare_validation.py``: a validation set whose loss covers only the target tokens."""

    input: str = field(default="", metadata={"required": True})
    """JSON lines: LAMBADA passages (``{"text": ...}``, the target is the final word) or (context, continuation)
    pairs."""

    output_prefix: str = field(default="", metadata={"required": True})
    """Output prefix: writes ``PREFIX.bin/.idx``, ``PREFIX.targets.npy`` and ``PREFIX.manifest.json``."""

    tokenizer_model: str = field(default="", metadata={"required": True})
    """SentencePiece ``.model`` or Hugging Face ``tokenizer.json``."""

    format: str = field(default="lambada", metadata={"choices": VALIDATION_FORMATS})
    """``lambada``: the final word of each passage is the target; ``pairs``: the continuation is."""

    json_key: str = "text"
    """``lambada``: JSON field holding the passage."""

    context_key: str = "context"
    """``pairs``: JSON field holding the context."""

    continuation_key: str = "continuation"
    """``pairs``: JSON field holding the continuation (the target)."""

    max_length: int | None = None
    """Left-truncate contexts so that every example has at most this many tokens."""

    strict: bool = False
    """Stop at the first bad input line with an error naming ``file:line`` instead of skipping and counting it."""

    overwrite: bool = False
    """Replace an existing output at the prefix made from another input, tokenizer or settings (one made the same
    way is kept as it is). The old files stay until the new set is complete; then its stale files are removed."""

    def __post_init__(self) -> None:
        if self.format not in VALIDATION_FORMATS:
            raise ValueError(f"format must be one of {VALIDATION_FORMATS}, got {self.format!r}")


@dataclass
class SubsetConfig:
    """Settings of ``tools/select_subset.py``: the top-k / top-fraction / random subset of an indexed dataset."""

    data_prefix: str = field(default="", metadata={"required": True})
    """Source indexed dataset (``PREFIX.bin/.idx``)."""

    output_prefix: str = field(default="", metadata={"required": True})
    """Output prefix: writes ``OUT.bin/.idx``, ``OUT.indices.npy``, ``OUT.scores.npy`` and ``OUT.subset.json``."""

    scores: str | None = None
    """``.npy`` of numeric scores, a 1-D array of one per source sequence (integers are scores too; booleans and NaN
    are refused): the highest are kept."""

    indices: str | None = None
    """``.npy`` of a 1-D integer array of distinct source indices in ``[0, N)`` to keep as they are (instead of
    scores)."""

    fraction: float = field(default=0.2, metadata={"exclusive": "size"})
    """Fraction of the sequences to keep, in (0, 1] (``round(fraction * N)``, at least 1)."""

    top_k: int | None = field(default=None, metadata={"exclusive": "size"})
    """Number of sequences to keep, 1..N (instead of a fraction)."""

    method: str = field(default="top", metadata={"choices": SUBSET_METHODS})
    """``top``: the highest scores, ties to the lower index; ``random``: a seeded uniform sample (no scores
    needed)."""

    seed: int = 0
    """Seed of ``random``."""

    overwrite: bool = False
    """Replace an existing subset at the output prefix that differs from this one (an identical one is kept as it
    is). The old files stay until the new subset is complete. The source itself is never overwritten."""

    def __post_init__(self) -> None:
        if self.method not in SUBSET_METHODS:
            raise ValueError(f"method must be one of {SUBSET_METHODS}, got {self.method!r}")
        if self.scores is not None and self.indices is not None:
            raise ValueError("give scores (--scores) or indices (--indices), not both")
        if self.method == "top" and self.scores is None and self.indices is None:
            raise ValueError("method 'top' needs scores (--scores) or indices (--indices)")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1 (and at most the source's sequences), got {self.top_k}")


@dataclass
class InspectConfig:
    """Settings of ``tools/inspect_indexed.py``: a summary of an indexed dataset, optionally with decoded entries."""

    prefix: str = field(default="", metadata={"positional": True})
    """Indexed-dataset prefix (``PREFIX.bin/.idx``)."""

    tokenizer_model: str | None = None
    """Decode the first entries with this tokenizer."""

    show: int = 2
    """Entries to decode."""

    chars: int = 300
    """Characters shown per decoded entry."""

    sequence: int | None = None
    """Show stored sequence N instead of the summary: its text (decoded with the tokenizer the dataset's manifest
    names, or ``--tokenizer-model``) and its sources, one line per document span (from the origins sidecar)."""

    json: bool = False
    """Print the summary as one JSON object."""
