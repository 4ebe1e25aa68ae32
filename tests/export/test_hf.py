"""Hugging Face GPT-NeoX export and import: logits, tokenizer ids, generate, round trip, refusals, CLI."""

import glob
import gzip
import json
import os
import shutil

import pytest
import torch

from megatron_bliss.checkpointing import load_model, read_metadata, save_model
from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER, build_tokenizer
from megatron_bliss.export import hf
from megatron_bliss.models import build_gpt, get_preset
from megatron_bliss.models.gpt import gpt_logits
from tests.conftest import REPO_ROOT, run_torchrun

transformers = pytest.importorskip("transformers")

CFG = get_preset("tiny", seq_length=64)
SAMPLE = os.path.join(REPO_ROOT, "tests", "assets", "c4_sample")


def sample_texts() -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(SAMPLE, "*.json.gz"))):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


def sample_tokens(n: int = 2) -> torch.Tensor:
    """``[n, seq_length]`` ids of real text (the first long documents of the sample)."""
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    rows = [ids[:CFG.seq_length] for ids in map(tok.tokenize, sample_texts()) if len(ids) >= CFG.seq_length]
    return torch.tensor(rows[:n], dtype=torch.long)


def perturbed_model(seed: int = 0):
    """A TP=1 tiny GPT whose every weight (biases and LayerNorms too) is off its initial value."""
    model = build_gpt(CFG, attention_backend="local")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / ours.abs().max())


def hf_logits(export_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.GPTNeoXForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gpt_logits(model.eval(), tokens)


@pytest.fixture(scope="module")
def exported(single_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = perturbed_model()
    ckpt = str(root / "save" / "iter_0000003")
    save_model(ckpt, model, CFG, "target", {"step": 3})
    with open(root / "save" / "config.yaml", "w") as f:
        f.write("model:\n  seq_length: 64\ntrain:\n  global_batch_size: 8\n")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run:\n  method: bliss\n  rounds: 4\n")
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": "abc123",
                                                       "inputs": {"data/shard0.bin": "f00d" * 16}}))
    out = str(root / "export")
    hf.export_hf(ckpt, out, DEFAULT_TOKENIZER, run_dir=str(run_dir))
    return {"root": root, "ckpt": ckpt, "dir": out, "model": model}


def test_logits_match_transformers(exported):
    tokens = sample_tokens()
    ours, theirs = our_logits(exported["model"], tokens), hf_logits(exported["dir"], tokens)
    assert ours.shape == theirs.shape == (2, CFG.seq_length, CFG.padded_vocab_size())
    err = relative_error(ours, theirs)
    print(f"logits relative error (TP=1 checkpoint): {err:.3g}")
    assert err < 1e-5, err


def test_export_files_and_card(exported):
    d = exported["dir"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert os.path.isfile(os.path.join(d, name)), name
    assert not [n for n in os.listdir(os.path.dirname(d)) if ".tmp" in n]
    config = json.load(open(os.path.join(d, "config.json")))
    assert config["use_parallel_residual"] is False and config["tie_word_embeddings"] is False
    assert config["rotary_pct"] == 0.25 and config["vocab_size"] == 8064 and config["hidden_act"] == "gelu"
    assert config["max_position_embeddings"] == CFG.seq_length
    tok = build_tokenizer(DEFAULT_TOKENIZER)
    assert json.load(open(os.path.join(d, "generation_config.json")))["eos_token_id"] == tok.eod
    card = open(os.path.join(d, "README.md")).read()
    assert "preset: `tiny`" in card and "tokens seen: 1,536" in card  # 3 steps x 8 x 64
    assert "selection method: bliss" in card and "f00d" in card and "abc123" in card


def test_exported_tokenizer_gives_our_ids(exported):
    ours = build_tokenizer(DEFAULT_TOKENIZER)
    theirs = transformers.AutoTokenizer.from_pretrained(exported["dir"])
    texts = sample_texts() + ["  two  spaces", " leading space", "a\nb\n\nc", "é 😀 中文 1234567", ""]
    mismatched = [t[:60] for t in texts if ours.tokenize(t) != theirs(t)["input_ids"]]
    assert not mismatched, mismatched[:3]
    assert theirs.eos_token_id == ours.eod
    text = "Héllo wörld 😀\nnext line"
    assert theirs.decode(theirs(text)["input_ids"]) == ours.detokenize(ours.tokenize(text))


def test_generate_runs_and_matches_greedy(exported):
    model = transformers.GPTNeoXForCausalLM.from_pretrained(exported["dir"], dtype=torch.float32).eval()
    tokens = sample_tokens(1)[:, :16]
    out = model.generate(tokens, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20) and torch.equal(out[:, :16], tokens)
    ours = exported["model"]
    seq = tokens
    for _ in range(4):  # our greedy decoding gives the same continuation
        nxt = our_logits(ours, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq, out)


def test_import_round_trip_is_bit_identical(exported):
    ckpt = str(exported["root"] / "imported")
    hf.import_hf(exported["dir"], ckpt)
    meta = read_metadata(ckpt)
    assert meta["models"]["model"]["role"] == "target"
    fresh = build_gpt(CFG, attention_backend="local")
    load_model(ckpt, fresh, CFG, "target")
    original = dict(exported["model"].named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, original[name]), name
    again = str(exported["root"] / "export_again")
    hf.export_hf(ckpt, again, DEFAULT_TOKENIZER)
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(exported["dir"], "model.safetensors")), load_file(
        os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_residual_config_refused(exported, tmp_path):
    d = str(tmp_path / "pythia_like")
    shutil.copytree(exported["dir"], d)
    config = json.load(open(os.path.join(d, "config.json")))
    config["use_parallel_residual"] = True
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(hf.ExportError, match="use_parallel_residual.*sequential"):
        hf.import_hf(d, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt")


def test_foreign_config_without_our_key(exported, tmp_path):
    d = str(tmp_path / "foreign")
    shutil.copytree(exported["dir"], d)
    config = json.load(open(os.path.join(d, "config.json")))
    del config[hf.CONFIG_KEY]
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    cfg = hf.model_config_from_hf(config, d, preset="tiny", overrides={"vocab_size": 8000})
    assert cfg.shape_dict() == CFG.shape_dict() and cfg.rotary_percent == 0.25


def test_cli_refuses_existing_output_then_overwrites(exported, tmp_path, capsys):
    out = tmp_path / "cli_export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--checkpoint", exported["ckpt"], "--preset", "tiny", "--tokenizer-model", DEFAULT_TOKENIZER,
            "--output", str(out)]
    assert hf.export_main(args) == 2
    assert (out / "keep.txt").exists()
    assert hf.export_main(args + ["--preset", "debug"]) == 2  # preset mismatch names both
    assert hf.export_main(args + ["--overwrite", "--model.seq_length=32"]) == 0
    assert not (out / "keep.txt").exists()
    assert json.load(open(out / "config.json"))["max_position_embeddings"] == 32
    assert hf.import_main(["--hf-dir", str(out), "--output", str(tmp_path / "ck")]) == 0
    assert hf.import_main(["--hf-dir", str(out), "--output", str(tmp_path / "ck")]) == 2


@pytest.mark.dist
@pytest.mark.slow
def test_export_of_tp2_pp2_checkpoint(single_process, tmp_path):
    ckpt = str(tmp_path / "tp2pp2")
    run_torchrun(os.path.join(REPO_ROOT, "tests", "export", "save_at_layout.py"), ckpt, "2", "2", nproc=4)
    out = str(tmp_path / "export")
    hf.export_hf(ckpt, out, DEFAULT_TOKENIZER)
    model = build_gpt(CFG, attention_backend="local")
    load_model(ckpt, model, CFG, "target")
    tokens = sample_tokens()
    err = relative_error(our_logits(model, tokens), hf_logits(out, tokens))
    print(f"logits relative error (TP=2/PP=2 checkpoint): {err:.3g}")
    assert err < 1e-5, err


def test_card_shows_the_rounds_evaluation(exported, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "round1" / "eval").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run:\n  method: random\n  rounds: 1\n")
    summary = {"tasks": {"tiny_mc": {"acc": 0.5, "acc_norm": 0.625, "metric": "acc_norm", "value": 0.625}},
               "mean": 0.625, "num_tasks": 1}
    phases = {"round1/eval": {"info": {"val_loss": 6.5}}, "round1/lm_eval": {"info": {"lm_eval": summary}}}
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": "h", "phases": phases}))
    facts = hf.run_facts(str(run_dir / "round1" / "eval" / "iter_0000003"), {"step": 3}, str(run_dir))
    assert facts["round"] == 1 and facts["val_loss"] == 6.5 and facts["lm_eval"]["mean"] == 0.625
    card = hf.model_card(CFG, facts, {"kind": "sentencepiece", "vocab_size": 8000, "sha256": "x", "eos": 0})
    assert "## Evaluation (round 1's evaluation branch)" in card and "validation loss: 6.5000" in card
    assert "| tiny_mc |" in card and "62.50" in card


def test_lm_eval_hf_model_on_the_export_matches_our_adapter(exported):
    """lm-eval's own ``hf`` model on the export and our adapter on the same weights: the same loglikelihood of
    every request of a local task, and the same accuracy. Our adapter is given the padded vocabulary (the export's
    softmax covers the padding rows too) and no document-start prefix (the hf model adds none)."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install 'megatron_bliss[eval]')")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megatron_bliss.eval.lm_eval import MegatronBlissLM

    tasks = os.path.join(REPO_ROOT, "tests", "eval", "assets", "tiny_mc")
    theirs = HFLM(pretrained=exported["dir"], dtype="float32", device="cpu", batch_size=4)
    ours = MegatronBlissLM(exported["model"], build_tokenizer(DEFAULT_TOKENIZER), CFG.seq_length, 4,
                           add_eod_prefix=False, vocab_size=CFG.padded_vocab_size(), progress=False)
    out = {}
    for name, lm in (("hf", theirs), ("ours", ours)):
        out[name] = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=tasks),
                                            log_samples=True)
    samples = {name: sorted(o["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for name, o in out.items()}
    a = torch.tensor([r[0][0] for s in samples["ours"] for r in s["resps"]], dtype=torch.float64)
    b = torch.tensor([r[0][0] for s in samples["hf"] for r in s["resps"]], dtype=torch.float64)
    assert a.shape == b.shape and a.numel() == 32  # 8 questions x 4 choices
    err = float(((a - b).abs() / b.abs()).max())
    print(f"loglikelihood relative error, ours vs lm-eval hf on the export: {err:.3g}")
    assert err < 1e-5, err
    for metric in ("acc,none", "acc_norm,none"):
        assert out["ours"]["results"]["tiny_mc"][metric] == out["hf"]["results"]["tiny_mc"][metric]
