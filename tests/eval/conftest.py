"""A tiny float64 target with the bundled tokenizer, and the local tasks, shared by the evaluation tests."""

import os
import re
import shutil

import pytest
import torch

from megatron_bliss.data import build_tokenizer
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from megatron_bliss.models import build_gpt, get_preset

SEQ = 32


def tiny_config():
    """Preset "tiny" narrowed to hidden 16 and 32 positions; vocabulary 8,000 (the bundled tokenizer's). A large
    init std makes the random model's predictions far from uniform, so errors in the scoring would show."""
    return get_preset("tiny", hidden_size=16, num_attention_heads=4, seq_length=SEQ, init_method_std=0.5,
                      attention_backend="local")


@pytest.fixture(scope="module")
def tiny_target(single_process):
    """``(model in float64, tokenizer, model config)``."""
    torch.manual_seed(0)
    cfg = tiny_config()
    return build_gpt(cfg).double().eval(), build_tokenizer(DEFAULT_TOKENIZER), cfg


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def local_tasks(root):
    """``root`` (a pathlib directory) filled with the local tiny_mc task and the stock sciq task with its dataset
    replaced by local JSON files (the recipe of docs/eval.md for running a BLISS task offline); returns ``root``."""
    import lm_eval.tasks

    shutil.copytree(os.path.join(ASSETS, "tiny_mc"), root / "tiny_mc")
    with open(os.path.join(os.path.dirname(lm_eval.tasks.__file__), "sciq", "sciq.yaml")) as f:
        stock = f.read()
    data = os.path.join(ASSETS, "sciq_sample.jsonl")
    local = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {root / 'hf_cache'}\n  data_files:\n"
             + "".join(f"    {split}: {data}\n" for split in ("train", "validation", "test")))
    stock = re.sub(r"^dataset_path:.*\n", local, stock, flags=re.M)
    os.makedirs(root / "sciq")
    with open(root / "sciq" / "sciq.yaml", "w") as f:
        f.write(re.sub(r"^dataset_name:.*\n", "", stock, flags=re.M))
    return root
