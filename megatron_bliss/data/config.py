"""DataConfig: every setting of the data stage (preprocessing C4 into indexed datasets and reading them back).

Checks that concern only data settings live in ``__post_init__``; checks across concerns (the data's sequence length
against the model's) belong to the root config's ``validate()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MODES = ("sequences", "documents")


@dataclass
class DataConfig:
    """Settings of ``tools/preprocess_c4.py`` and of the training-side readers."""

    input: list[str] = field(default_factory=list)
    """Input files, directories or globs: C4 JSON lines (``.json``/``.jsonl``, optionally ``.gz``) or DsDm parquet."""

    output_prefix: str = ""
    """Output prefix: writes ``PREFIX.bin/.idx`` (or ``PREFIX_shard{K}.bin/.idx``) and ``PREFIX.manifest.json``."""

    tokenizer_model: str | None = None
    """SentencePiece ``.model`` or Hugging Face ``tokenizer.json``; optional only for pre-tokenized parquet input."""

    seq_length: int = 1024
    """Tokens per stored sequence in ``sequences`` mode (one stored sequence = one sample = one scored unit)."""

    mode: str = "sequences"
    """``sequences``: documents+EOD concatenated and cut into ``seq_length`` pieces; ``documents``: one entry each."""

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

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be at least 2, got {self.seq_length}")
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
