"""Command-line front ends of the data tools; ``tools/*.py`` are thin wrappers around these ``*_main`` functions.

This module owns argument parsing and logging set-up only. Every tool's flags are generated from its settings
dataclass in :mod:`megatron_bliss.data.config` by :func:`add_config_arguments` (names, types, defaults and help come
from the fields and their docstrings), and every command delegates to a library function of ``megatron_bliss.data``
that can be called directly. Each ``*_main(argv)`` returns a process exit code; bad input or settings end with a
one-line error naming the file, line or setting (exit code 2), and a file that cannot be written (a full disk) one
naming that file (exit code 1), never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import re
import sys
import textwrap
import types
import typing
from typing import Any, TypeVar

from megatron_bliss.data.sources import DataFormatError

logger = logging.getLogger("megatron_bliss.data")
T = TypeVar("T")


def setup_logging(verbose: bool = False) -> None:
    """INFO (or DEBUG) records of every logger to stderr, with a timestamp and the logger's name."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_command(fn, *args, **kwargs) -> int:
    """Calls ``fn``; a bad input or setting (it names the file, line or setting), or an output that is there already,
    is logged and gives exit code 2; a file that cannot be read or written (it is named) gives exit code 1."""
    try:
        fn(*args, **kwargs)
    except (DataFormatError, FileNotFoundError, FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    return 0


# ------------------------------------------------------------------------------------- dataclass -> argparse
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (the string literal right after its annotation)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source shipped: flags without help
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _plain(doc: str) -> str:
    """A field docstring without its reST markup."""
    return re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", doc).replace("``", "")


def _help_text(doc: str) -> str:
    """A field docstring as argparse help (``%`` escaped for argparse's formatting)."""
    return _plain(doc).replace("%", "%%")


def _value_type(tp: Any) -> tuple[Any, bool]:
    """``(element type, is_list)`` of a field annotation: ``X | None`` -> X, ``list[X]`` -> (X, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    if typing.get_origin(tp) is list or tp is list:
        (item,) = typing.get_args(tp) or (str,)
        return item, True
    return tp, False


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


class _Renamed(argparse.Action):
    """An old flag name: using it is a usage error that names the new flag."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} {self.message}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one argument per field of dataclass ``cls``: ``--field-name`` (or ``metadata["flag"]``), typed from the
    annotation, defaulting to the field's default, with the field's docstring as help.

    A ``bool`` field that defaults to False is a ``--name`` switch, one that defaults to True a ``--no-name`` switch.
    ``list[X]`` fields take one or more values. Field ``metadata`` keys: ``flag``, ``choices``, ``required``,
    ``positional``, ``exclusive`` (fields sharing the name form a mutually exclusive group) and ``renamed_from``
    (old flags, which are then an error naming the new one).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta, doc = f.metadata, _help_text(docs.get(f.name, ""))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        target = parser
        if "exclusive" in meta:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        tp, is_list = _value_type(hints[f.name])
        if tp is bool:
            if default:
                name = "--no-" + _flag(f)[2:]
                target.add_argument(name, dest=f.name, action="store_false",
                                    help=f"do not {doc[:1].lower()}{doc[1:]}" if doc else None)
            else:
                target.add_argument(_flag(f), dest=f.name, action="store_true", help=doc or None)
        else:
            kwargs: dict[str, Any] = {"type": tp, "help": doc or None}
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in meta:
                kwargs["choices"] = list(meta["choices"])
                if is_list:  # argparse would repeat the choices in the usage line
                    doc = f"{doc} One or more of: {', '.join(map(str, meta['choices']))}."
                    kwargs["help"] = doc
            if meta.get("positional"):
                target.add_argument(f.name, **kwargs)
            else:
                if "choices" not in meta or is_list:
                    kwargs["metavar"] = f.name.upper()
                if meta.get("required"):
                    kwargs["required"] = True
                else:
                    kwargs["default"] = default
                    if default not in (None, "", []):
                        shown = " ".join(map(str, default)) if is_list else str(default)
                        kwargs["help"] = f"{doc} (default: {shown.replace('%', '%%')})".lstrip()
                target.add_argument(_flag(f), dest=f.name, **kwargs)
        for old in meta.get("renamed_from", ()):
            parser.add_argument(old, action=_Renamed, dest=f"renamed_{f.name}",
                                message=f"was renamed {_flag(f)}: {_plain(docs.get(f.name, ''))}")


def config_from_args(cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser) -> T:
    """Builds ``cls`` from the parsed arguments of :func:`add_config_arguments`; a ``ValueError`` from its checks
    is a usage error (exit code 2) naming the setting."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as exc:
        parser.error(str(exc))


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """The settings ``cls`` from the command line ``argv`` (default ``sys.argv[1:]``), flags generated from it."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv), parser)


# --------------------------------------------------------------------------------------------------- commands
def preprocess_main(argv: list[str] | None = None) -> int:
    """``tools/preprocess_c4.py``: C4 JSON lines or DsDm parquet -> indexed shards + manifest."""
    from megatron_bliss.data.config import DataConfig
    from megatron_bliss.data.preprocessing import preprocess

    cfg = parse_config(DataConfig, argv, "Tokenize C4 JSON lines (or pass DsDm parquet through) into Megatron "
                                         ".bin/.idx shards with a JSON manifest.")
    setup_logging()
    return run_command(preprocess, cfg)


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    """``tools/train_tokenizer.py``: train a SentencePiece BPE model offline from C4-format input."""
    from megatron_bliss.data.config import TokenizerTrainingConfig
    from megatron_bliss.data.sources import expand_inputs
    from megatron_bliss.data.tokenizer import train_sentencepiece

    cfg = parse_config(TokenizerTrainingConfig, argv,
                       "Train a SentencePiece BPE tokenizer from a sample of C4 JSON lines.")
    setup_logging()
    return run_command(lambda: train_sentencepiece(expand_inputs(cfg.input), cfg.model_prefix, cfg.vocab_size,
                                                   cfg.num_docs, cfg.json_key, cfg.seed, cfg.threads))


def prepare_validation_main(argv: list[str] | None = None) -> int:
    """``tools/prepare_validation.py``: LAMBADA or (context, continuation) JSON lines -> tokens + loss mask."""
    from megatron_bliss.data.config import ValidationSetConfig
    from megatron_bliss.data.validation import prepare_validation

    cfg = parse_config(ValidationSetConfig, argv, "Build a validation set whose loss covers only the target tokens.")
    setup_logging()
    return run_command(prepare_validation, cfg.input, cfg.output_prefix, cfg.tokenizer_model, fmt=cfg.format,
                       json_key=cfg.json_key, context_key=cfg.context_key, continuation_key=cfg.continuation_key,
                       max_length=cfg.max_length, strict=cfg.strict, overwrite=cfg.overwrite)


def select_subset_main(argv: list[str] | None = None) -> int:
    """``tools/select_subset.py``: keep the top (or a random) fraction of a dataset's sequences by score."""
    from megatron_bliss.data.config import SubsetConfig
    from megatron_bliss.data.subsets import write_subset

    cfg = parse_config(SubsetConfig, argv, "Write the top-k / top-fraction / random subset of an indexed dataset.")
    setup_logging()
    kind = "indices" if cfg.indices is not None else "scores" if cfg.scores is not None else None
    return run_command(write_subset, cfg.data_prefix, cfg.indices or cfg.scores, cfg.output_prefix, kind=kind,
                       fraction=cfg.fraction, top_k=cfg.top_k, method=cfg.method, seed=cfg.seed,
                       overwrite=cfg.overwrite)


def inspect_main(argv: list[str] | None = None) -> int:
    """``tools/inspect_indexed.py``: summary of an indexed dataset, optionally with decoded samples; with
    ``--sequence N``, stored sequence N's text and the document spans it holds."""
    from megatron_bliss.data.config import InspectConfig
    from megatron_bliss.data.origins import read_origins
    from megatron_bliss.data.summary import describe

    cfg = parse_config(InspectConfig, argv, "Describe a Megatron indexed dataset (.bin/.idx).")
    setup_logging()
    if cfg.sequence is not None:
        return _inspect_sequence(cfg)
    try:
        summary = describe(cfg.prefix, cfg.tokenizer_model, cfg.show, cfg.chars)
        origins = read_origins(cfg.prefix)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    samples = summary.pop("samples", None)
    summary["origins"] = (f"{origins.records.size} spans of {len(origins.files)} input file(s) "
                          f"({cfg.prefix}.origins.*)" if origins is not None else "none")
    if samples is not None:
        summary["samples"] = samples
    if cfg.json:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    else:
        samples = summary.pop("samples", [])
        for key, value in summary.items():
            sys.stdout.write(f"{key:>22}: {value}\n")
        for i, text in samples:
            sys.stdout.write(f"--- entry {i} ---\n{text}\n")
    return 0


def _inspect_sequence(cfg) -> int:
    """Prints stored sequence ``cfg.sequence`` of ``cfg.prefix``: its text, then one line per span of its origins."""
    from megatron_bliss.data.origins import describe_sequence

    try:
        view = describe_sequence(cfg.prefix, cfg.sequence, cfg.tokenizer_model)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    if cfg.json:
        sys.stdout.write(json.dumps(view, indent=1) + "\n")
        return 0
    spans = view["spans"]
    sys.stdout.write(f"{view['prefix']}: sequence {view['sequence']} of {view['sequences']}, "
                     f"{len(view['tokens'])} tokens\n--- text ---\n")
    if view["text"] is None:
        sys.stdout.write(f"(no tokenizer recorded; token ids) {view['tokens']}\n")
    else:
        sys.stdout.write(view["text"] + "\n")
    if spans is None:
        sys.stdout.write(f"--- sources ---\nnone recorded: {view['prefix']} has no origins sidecar\n")
        return 0
    sys.stdout.write(f"--- sources: {len(spans)} span(s) ---\n")
    for span in spans:
        end = span["seq_offset"] + span["length"]
        sys.stdout.write(f"tokens {span['seq_offset']}..{end}: {span['file']}:{span['line']} document tokens "
                         f"{span['doc_offset']}..{span['doc_offset'] + span['length']}"
                         + (f" {span['url']}" if span["url"] is not None else "") + "\n")
    return 0
