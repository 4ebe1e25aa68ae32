"""Validation sets whose loss covers only a target: LAMBADA's final word, or a (context, continuation) pair.

This module owns building and loading them. On disk, ``PREFIX.bin/.idx`` is an indexed dataset with one entry
per example (context tokens then target tokens, no EOD), and ``PREFIX.targets.npy`` is an ``int64 [N, 2]`` array
of ``(start, end)`` token positions of each example's target inside its entry: the loss mask is 1 exactly on
``start <= t < end``. ``PREFIX.manifest.json`` records the input, its checksum, the tokenizer, the counts and a
fingerprint (input size and mtime, tokenizer checksum, settings): a rerun with the same fingerprint does nothing, an
existing output with another one is refused unless ``overwrite`` is set, and all files are written under temporary
names and renamed in together (the manifest last), the stale files of a replaced output removed only after.

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

from megatron_bliss.data.indexed import (
    StagedOutput,
    check_output_prefix,
    data_paths,
    dtype_for_vocab,
    file_sha256,
    output_files,
)
from megatron_bliss.data.sources import (
    DataFormatError,
    ReadStatus,
    check_input,
    loads_json,
    new_skip_counts,
    read_line_chunks,
)

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
                record = loads_json(raw.decode("utf-8"))
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
                       max_length: int | None = None, strict: bool = False, overwrite: bool = False) -> dict:
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
        overwrite: replace an existing output at ``out_prefix`` made another way (one made the same way is kept
            as it is and its manifest returned).

    Returns:
        The manifest.

    Raises:
        ValueError: bad settings, an output prefix that is a directory, no usable example. FileExistsError: another
            output at ``out_prefix``, without ``overwrite``. DataFormatError: strict mode, the first bad line.
    """
    from megatron_bliss.data.tokenizer import build_tokenizer, tokenizer_info

    if fmt not in ("lambada", "pairs"):
        raise ValueError(f"format must be 'lambada' or 'pairs', got {fmt!r}")
    check_output_prefix(out_prefix)
    check_input(input_path)  # a missing, empty, non-regular or unsupported-compressed --input, named
    tokenizer = build_tokenizer(tokenizer_model)
    info = tokenizer_info(tokenizer)
    stat = os.stat(input_path)
    fingerprint = {"input": [os.path.abspath(input_path), stat.st_size, stat.st_mtime_ns],
                   "tokenizer_sha256": info["sha256"],
                   "settings": {"format": fmt, "json_key": json_key, "context_key": context_key,
                                "continuation_key": continuation_key, "max_length": max_length, "strict": strict}}
    old_files = output_files(out_prefix)
    if old_files:
        old = _read_json(out_prefix + ".manifest.json")
        complete = all(os.path.exists(p) for p in (*data_paths(out_prefix), out_prefix + ".targets.npy"))
        if old is not None and old.get("fingerprint") == fingerprint and complete:
            logger.info("%s: already complete from this input and settings; nothing to do", out_prefix)
            return old
        difference = _difference(old, fingerprint, old_files)
        if not overwrite:
            raise FileExistsError(f"{out_prefix}: an output exists there ({difference}); pass --overwrite "
                                  "(overwrite=True) to replace it, or choose another --output-prefix")
        logger.warning("%s: replacing the existing output (%s) once the new set is complete", out_prefix, difference)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    staged = StagedOutput()
    writer = staged.writer(out_prefix, dtype)
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
        if not spans:
            why = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "no lines"
            raise ValueError(f"{input_path}: 0 usable examples (skipped: {why}); at least 1 needed; nothing was "
                             "written")
        writer.finalize(commit=False)
        targets = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        staged.write(out_prefix + ".targets.npy", lambda f: np.save(f, targets))
        manifest = {"format": "megatron_bliss.validation/1", "input": {"path": input_path,
                    "sha256": file_sha256(input_path), "format": fmt}, "tokenizer": info,
                    "examples": len(spans), "target_tokens": int(sum(e - s for s, e in spans)), "skipped": skipped,
                    "loss_mask": "targets.npy holds (start, end) per example; mask = 1 on start <= t < end",
                    "fingerprint": fingerprint}
        staged.write(out_prefix + ".manifest.json", lambda f: json.dump(manifest, f, indent=1), "w")
        staged.commit(stale=old_files)
    except BaseException:
        staged.abort()
        raise
    logger.info("%s: %d examples, %d target tokens; skipped %s", out_prefix, len(spans), manifest["target_tokens"],
                {k: v for k, v in skipped.items() if v} or "none")
    return manifest


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when there is none or it does not parse."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _difference(old: dict | None, fingerprint: dict, old_files: list[str]) -> str:
    """What differs between an existing output (its manifest ``old``) and the set asked for, in a few words."""
    if old is None:
        names = ", ".join(os.path.basename(p) for p in old_files[:4]) + (", ..." if len(old_files) > 4 else "")
        return f"files without a manifest: {names}"
    theirs = old.get("fingerprint")
    if old.get("format") != "megatron_bliss.validation/1" or not isinstance(theirs, dict):
        return f"a manifest of format {old.get('format')!r} without a validation-set fingerprint"
    what = [f"{key} {theirs.get('settings', {}).get(key)!r} -> {value!r}"
            for key, value in fingerprint["settings"].items() if theirs.get("settings", {}).get(key) != value]
    if theirs.get("input") != fingerprint["input"]:
        what.append("the input (path, size or modification time)")
    if theirs.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        what.append("the tokenizer")
    return "other " + "; ".join(what) if what else "files are missing"


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
