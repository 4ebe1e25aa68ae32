"""Command-line front ends of the data tools; ``tools/*.py`` are thin wrappers around these ``*_main`` functions.

This module owns argument parsing and logging set-up only; every command delegates to a library function of
``megatron_bliss.data`` that can be called directly. Each ``*_main(argv)`` returns a process exit code; bad input
or settings end with a one-line error naming the file, line or setting (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from megatron_bliss.data.sources import DataFormatError

logger = logging.getLogger("megatron_bliss.data")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run(fn, *args, **kwargs) -> int:
    try:
        fn(*args, **kwargs)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


def preprocess_main(argv: list[str] | None = None) -> int:
    """``tools/preprocess_c4.py``: C4 JSON lines or DsDm parquet -> indexed shards + manifest."""
    from megatron_bliss.data.config import DataConfig
    from megatron_bliss.data.preprocessing import preprocess

    p = argparse.ArgumentParser(description="Tokenize C4 JSON lines (or pass DsDm parquet through) into Megatron "
                                            ".bin/.idx shards with a JSON manifest.")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (quote globs)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", help="SentencePiece .model or HF tokenizer.json")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--mode", choices=("sequences", "documents"), default="sequences")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json-key", default="text")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line (error names file:line)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--eod-token", help="HF tokenizers: text of the end-of-document token")
    p.add_argument("--vocab-size", type=int, help="parquet input without --tokenizer-model: vocabulary size")
    p.add_argument("--parquet-column", default="input_ids")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--keep-parts", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    _setup_logging()
    try:
        cfg = DataConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    except ValueError as exc:
        p.error(str(exc))
    return _run(preprocess, cfg)


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    """``tools/train_tokenizer.py``: train a SentencePiece BPE model offline from C4-format input."""
    from megatron_bliss.data.sources import expand_inputs
    from megatron_bliss.data.tokenizer import train_sentencepiece

    p = argparse.ArgumentParser(description="Train a SentencePiece BPE tokenizer from a sample of C4 JSON lines.")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--num-docs", type=int, default=20000, help="documents sampled for training")
    p.add_argument("--json-key", default="text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    _setup_logging()
    return _run(lambda: train_sentencepiece(expand_inputs(args.input), args.model_prefix, args.vocab_size,
                                            args.num_docs, args.json_key, args.seed, args.threads))


def prepare_validation_main(argv: list[str] | None = None) -> int:
    """``tools/prepare_validation.py``: LAMBADA or (context, continuation) JSON lines -> tokens + loss mask."""
    from megatron_bliss.data.validation import prepare_validation

    p = argparse.ArgumentParser(description="Build a validation set whose loss covers only the target tokens.")
    p.add_argument("--input", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--format", choices=("lambada", "pairs"), default="lambada")
    p.add_argument("--json-key", default="text", help="lambada: field holding the passage")
    p.add_argument("--context-key", default="context")
    p.add_argument("--continuation-key", default="continuation")
    p.add_argument("--max-length", type=int, help="left-truncate contexts so examples fit")
    p.add_argument("--strict", action="store_true")
    args = p.parse_args(argv)
    _setup_logging()
    return _run(prepare_validation, args.input, args.output_prefix, args.tokenizer_model, fmt=args.format,
                json_key=args.json_key, context_key=args.context_key, continuation_key=args.continuation_key,
                max_length=args.max_length, strict=args.strict)


def select_subset_main(argv: list[str] | None = None) -> int:
    """``tools/select_subset.py``: keep the top (or a random) fraction of a dataset's sequences by score."""
    from megatron_bliss.data.subsets import write_subset

    p = argparse.ArgumentParser(description="Write the top-k / top-fraction / random subset of an indexed dataset.")
    p.add_argument("--data-prefix", required=True, help="source indexed dataset")
    p.add_argument("--scores", help=".npy float scores aligned with the source's sequences")
    p.add_argument("--indices", help=".npy integer indices to keep (instead of --scores)")
    p.add_argument("--output-prefix", required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, default=0.2)
    group.add_argument("--top-k", type=int)
    p.add_argument("--method", choices=("top", "random"), default="top")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _setup_logging()
    if (args.scores is None) == (args.indices is None) and args.method == "top":
        p.error("give exactly one of --scores or --indices")
    source = args.scores or args.indices
    return _run(write_subset, args.data_prefix, source, args.output_prefix, fraction=args.fraction,
                top_k=args.top_k, method=args.method, seed=args.seed)


def inspect_main(argv: list[str] | None = None) -> int:
    """``tools/inspect_indexed.py``: summary of an indexed dataset, optionally with decoded samples."""
    from megatron_bliss.data.summary import describe

    p = argparse.ArgumentParser(description="Describe a Megatron indexed dataset (.bin/.idx).")
    p.add_argument("prefix")
    p.add_argument("--tokenizer-model", help="decode the first entries with this tokenizer")
    p.add_argument("--show", type=int, default=2, help="entries to decode")
    p.add_argument("--chars", type=int, default=300, help="characters shown per decoded entry")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    _setup_logging()
    try:
        summary = describe(args.prefix, args.tokenizer_model, args.show, args.chars)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    else:
        samples = summary.pop("samples", [])
        for key, value in summary.items():
            sys.stdout.write(f"{key:>22}: {value}\n")
        for i, text in samples:
            sys.stdout.write(f"--- entry {i} ---\n{text}\n")
    return 0


def build_corpus_main(argv: list[str] | None = None) -> int:
    """``tools/build_sample_corpus.py``: a real-text C4-format corpus (and LAMBADA sample) from Debian packages."""
    from megatron_bliss.data.corpus import SOURCES, build_corpus, build_lambada_sample

    p = argparse.ArgumentParser(description="Build a C4-format corpus from texts shipped by Debian packages "
                                            "(apt-get install bible-kjv bible-kjv-text dict-gcide dict-jargon "
                                            "dict-devil dict-foldoc fortunes python3.11-doc).")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--sources", nargs="+", default=sorted(SOURCES), choices=sorted(SOURCES))
    p.add_argument("--target-mb", type=float, help="stop at this many MB of JSON lines (default: all)")
    p.add_argument("--num-files", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambada-examples", type=int, default=0, help="also write lambada_sample.jsonl (KJV held out)")
    args = p.parse_args(argv)
    _setup_logging()

    def build() -> None:
        summary = build_corpus(args.output_dir, args.sources, args.target_mb, args.num_files, args.seed)
        logger.info("per source: %s", summary["per_source"])
        if args.lambada_examples:
            import os

            n = build_lambada_sample(os.path.join(args.output_dir, "lambada_sample.jsonl"), args.lambada_examples,
                                     args.seed)
            logger.info("wrote %d LAMBADA-format examples", n)

    return _run(build)
