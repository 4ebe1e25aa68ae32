"""Validation sets whose loss covers only a target: LAMBADA's final word, or a (context, continuation) pair.

This module owns building and loading them. On disk, ``PREFIX.bin/.idx`` is an indexed dataset with one entry
per example (context tokens then target tokens, no EOD), and ``PREFIX.targets.npy`` is an ``int64 [N, 2]`` array
of ``(start, end)`` token positions of each example's target inside its entry: the loss mask is 1 exactly on
``start <= t < end``. ``PREFIX.manifest.json`` records the input, its checksum, the tokenizer and the counts.

Target tokens are found by tokenizing the whole text and the context alone: when the whole text's tokens start
with the context's, the rest is the target; otherwise (a token merged across the boundary) the example is
context tokens + the continuation tokenized on its own. Either way the target tokens decode to the target.

:func:`load_validation_set` returns right-padded ``int64`` tokens ``[N, T]`` and a ``float32`` loss mask ``[N, T]``
aligned with the tokens: ``mask[i, t] = 1`` means token ``t`` is a target token, predicted from positions ``< t``
(use ``mask[:, 1:]`` with ``labels = tokens[:, 1:]``; :func:`megatron_bliss.data.loader.split_next_token`). Reading
and cropping are :mod:`megatron_bliss.data.loader`'s (one rule for every consumer of a validation set).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from megatron_bliss.data.indexed import IndexedWriter, dtype_for_vocab, file_sha256, replace_atomic
from megatron_bliss.data.sources import DataFormatError, ReadStatus, new_skip_counts, read_line_chunks

logger = logging.getLogger(__name__)


def split_lambada(text: str) -> tuple[str, str]:
    """Splits a LAMBADA passage into ``(context, target)``: the target is the final word with its leading space."""
    stripped = text.rstrip()
    cut = max(stripped.rfind(" "), stripped.rfind("\n"))
    if cut <= 0:
        raise ValueError("passage has no context before its final word")
    return stripped[:cut], stripped[cut:]


def encode_example(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Tokens of ``context + continuation`` and the position where the continuation's tokens start."""
    ctx = tokenizer.tokenize(context)
    whole = tokenizer.tokenize(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return whole, len(ctx)
    return ctx + tokenizer.tokenize(continuation.lstrip()), len(ctx)


def _iter_examples(path: str, fmt: str, json_key: str, context_key: str, continuation_key: str, strict: bool,
                   skipped: dict):
    """Yields ``(context, continuation)``; bad lines are counted in ``skipped`` (or raised when strict)."""
    status = ReadStatus()
    for first_line, blob, _ in read_line_chunks(path, status=status):
        for offset, raw in enumerate(blob.split(b"\n")):
            line_no = first_line + offset
            reason, detail, pair = None, "", None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                reason, detail = "invalid_utf8", str(exc)
            except ValueError as exc:
                reason, detail = "malformed_json", str(exc)
            if reason is None:
                keys = (json_key,) if fmt == "lambada" else (context_key, continuation_key)
                if not isinstance(record, dict) or any(k not in record for k in keys):
                    reason, detail = "missing_key", f"needs {list(keys)}"
                elif any(not isinstance(record[k], str) for k in keys):
                    reason = "wrong_type"
                elif fmt == "lambada":
                    try:
                        pair = split_lambada(record[json_key])
                    except ValueError as exc:
                        reason, detail = "empty_text", str(exc)
                else:
                    pair = (record[context_key], record[continuation_key])
                    if not pair[1].strip():
                        reason, detail = "empty_text", "empty continuation"
            if reason is not None:
                if strict:
                    raise DataFormatError(path, line_no, reason, detail)
                skipped[reason] += 1
                continue
            yield pair
    if status.truncated:
        if strict:
            raise DataFormatError(path, status.break_line, "truncated_gzip", status.detail)
        skipped["truncated_gzip"] += 1


def prepare_validation(input_path: str, out_prefix: str, tokenizer_model: str, *, fmt: str = "lambada",
                       json_key: str = "text", context_key: str = "context", continuation_key: str = "continuation",
                       max_length: int | None = None, strict: bool = False) -> dict:
    """Builds ``OUT.bin/.idx`` + ``OUT.targets.npy`` + ``OUT.manifest.json`` from JSON lines.

    Args:
        input_path: LAMBADA-format (``{"text": ...}``) or pairs-format (``{"context", "continuation"}``) JSON lines.
        out_prefix: output prefix.
        tokenizer_model: tokenizer file (see :func:`~megatron_bliss.data.tokenizer.build_tokenizer`).
        fmt: ``"lambada"`` or ``"pairs"``.
        json_key: LAMBADA passage field.
        context_key: pairs: context field.
        continuation_key: pairs: continuation field.
        max_length: drop context tokens from the left so an example has at most this many tokens.
        strict: stop at the first bad line.

    Returns:
        The manifest.
    """
    from megatron_bliss.data.tokenizer import build_tokenizer, tokenizer_info

    if fmt not in ("lambada", "pairs"):
        raise ValueError(f"format must be 'lambada' or 'pairs', got {fmt!r}")
    tokenizer = build_tokenizer(tokenizer_model)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writer = IndexedWriter(out_prefix, dtype)
    spans, skipped = [], new_skip_counts()
    try:
        for context, continuation in _iter_examples(input_path, fmt, json_key, context_key, continuation_key,
                                                    strict, skipped):
            tokens, start = encode_example(tokenizer, context, continuation)
            if max_length is not None and len(tokens) > max_length:
                cut = len(tokens) - max_length
                if cut >= start:
                    raise ValueError(f"{input_path}: a target alone is longer than max_length={max_length}")
                tokens, start = tokens[cut:], start - cut
            writer.add(np.asarray(tokens), np.array([len(tokens)]))
            spans.append((start, len(tokens)))
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    with open(out_prefix + ".targets.npy.tmp", "wb") as f:
        np.save(f, np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    replace_atomic(out_prefix + ".targets.npy.tmp", out_prefix + ".targets.npy")
    manifest = {"format": "megatron_bliss.validation/1", "input": {"path": input_path,
                "sha256": file_sha256(input_path), "format": fmt}, "tokenizer": tokenizer_info(tokenizer),
                "examples": len(spans), "target_tokens": int(sum(e - s for s, e in spans)), "skipped": skipped,
                "loss_mask": "targets.npy holds (start, end) per example; mask = 1 on start <= t < end"}
    with open(out_prefix + ".manifest.json.tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    replace_atomic(out_prefix + ".manifest.json.tmp", out_prefix + ".manifest.json")
    logger.info("%s: %d examples, %d target tokens; skipped %s", out_prefix, len(spans), manifest["target_tokens"],
                {k: v for k, v in skipped.items() if v} or "none")
    return manifest


def load_validation_set(prefix: str, pad_id: int = 0, max_length: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Loads a validation set as padded arrays, under the crop rule of :mod:`megatron_bliss.data.loader`.

    Args:
        prefix: a prefix written by :func:`prepare_validation`.
        pad_id: value of padding positions (never counted: their mask is 0).
        max_length: width of the rows: shorter examples are right-padded, longer ones keep their last
            ``max_length`` tokens (they hold the target); default: the longest example, nothing cropped.

    Returns:
        ``(tokens int64 [N, T], loss_mask float32 [N, T])``; ``torch.from_numpy`` gives LongTensor/FloatTensor.

    Raises:
        FileNotFoundError: ``PREFIX.targets.npy`` (or the dataset) is missing. ValueError: a target span does not
            fit in ``max_length`` tokens with one token of context, or an example has no target to predict.
    """
    from megatron_bliss.data.loader import crop_examples, read_examples

    if not os.path.exists(prefix + ".targets.npy"):
        raise FileNotFoundError(f"{prefix}.targets.npy: no such file (is {prefix!r} a prefix written by "
                                "prepare_validation?)")
    tokens, mask, _ = read_examples(prefix)
    return crop_examples(tokens, mask, max_length, has_targets=True, fixed_width=max_length is not None,
                         pad_id=pad_id, name=prefix)


__all__ = ["prepare_validation", "load_validation_set", "split_lambada", "encode_example"]
