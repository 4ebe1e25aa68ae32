"""Validation sets: the loss mask covers exactly the target (LAMBADA's final word, or a continuation)."""

import json

import numpy as np
import pytest

from megatron_bliss.data import DataFormatError, build_tokenizer, load_validation_set, prepare_validation
from tests.data.assets import LAMBADA_SAMPLE


def test_lambada_mask_covers_the_final_word(tmp_path, tokenizer_path):
    prefix = str(tmp_path / "lambada")
    manifest = prepare_validation(LAMBADA_SAMPLE, prefix, tokenizer_path)
    with open(LAMBADA_SAMPLE) as f:
        texts = [json.loads(line)["text"] for line in f]
    tokens, mask = load_validation_set(prefix)
    assert tokens.dtype == np.int64 and mask.dtype == np.float32 and tokens.shape == mask.shape
    assert manifest["examples"] == len(texts) == tokens.shape[0]
    tok = build_tokenizer(tokenizer_path)
    for i, text in enumerate(texts):
        target_ids = tokens[i][mask[i] == 1]
        assert tok.detokenize(target_ids).strip() == text.rsplit(" ", 1)[1]
        last = int(np.flatnonzero(mask[i])[-1])
        assert mask[i, last + 1:].sum() == 0 and mask[i, 0] == 0  # only the tail; position 0 is never a target
        assert tok.detokenize(tokens[i][: last + 1]) == text


def test_pairs_format_and_bad_lines(tmp_path, tokenizer_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"context": "The capital of France is", "continuation": " Paris"}\n'
                    '{"context": "no continuation"}\n'
                    'not json\n'
                    '{"context": "Two plus two is", "continuation": " four."}\n')
    prefix = str(tmp_path / "pairs")
    manifest = prepare_validation(str(path), prefix, tokenizer_path, fmt="pairs")
    assert manifest["examples"] == 2 and manifest["skipped"]["missing_key"] == 1
    assert manifest["skipped"]["malformed_json"] == 1
    tokens, mask = load_validation_set(prefix, max_length=16)
    tok = build_tokenizer(tokenizer_path)
    assert tokens.shape == (2, 16)
    assert tok.detokenize(tokens[0][mask[0] == 1]).strip() == "Paris"
    assert tok.detokenize(tokens[1][mask[1] == 1]).strip() == "four."
    with pytest.raises(DataFormatError, match=r"pairs.jsonl:2: missing_key"):
        prepare_validation(str(path), str(tmp_path / "strict"), tokenizer_path, fmt="pairs", strict=True)
