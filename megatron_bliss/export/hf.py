"""Hugging Face GPT-NeoX export and import of our GPTs (``tools/export_hf.py``, ``tools/import_hf.py``).

An export is a ``GPTNeoXForCausalLM`` directory: ``config.json``, ``model.safetensors``, ``generation_config.json``,
the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) and a model card ``README.md``. The checkpoint, saved
at any TP/PP layout, is loaded at TP=1/PP=1 in one process (distributed checkpoints reshard on load).

The mapping, checked by ``tests/export/test_hf.py`` (logits of both implementations agree to fp32 rounding):

- blocks are sequential (megatron-core has no parallel residual), hence ``use_parallel_residual=False``; an import
  of a parallel-residual config (the published Pythia models) is refused;
- megatron-core's fused ``linear_qkv`` rows are grouped per query group as ``[q, k, v]``; with multi-head attention
  (one group per head) that is per head ``[q_h, k_h, v_h]``, the layout of GPT-NeoX's ``query_key_value`` (viewed as
  ``[heads, 3, head_dim]``): the weight and bias are copied unchanged;
- rotary embeddings: both rotate the first ``rotary_percent`` of each head's dimensions, non-interleaved
  (rotate-half), frequencies ``base^(-2i/rot_dim)``: ``rotary_pct`` = rotary_percent, ``rotary_emb_base`` =
  rotary_base (and ``rope_parameters`` for transformers 5);
- megatron-core's MLP activation is ``torch.nn.functional.gelu`` (exact erf), HF ``hidden_act="gelu"``;
- the embedding and output layer keep the padded vocabulary (``vocab_size`` = padded rows); the tokenizer never
  produces a pad id.

``config.json`` also carries our full model config under ``megatron_bliss_model``, so that an import of an export
gives back the same :class:`ModelConfig` (and pretraining can warm-start from it at the same shape).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import tempfile

import torch

from megatron_bliss.models.presets import ModelConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_KEY = "megatron_bliss_model"
"""config.json key holding our ModelConfig as a dict (ignored by transformers)."""
SPIECE_UNDERLINE = "\u2581"

_LAYER_MAP = (  # ours (under decoder.layers.N.) -> GPT-NeoX (under gpt_neox.layers.N.)
    ("input_layernorm", "input_layernorm"),
    ("self_attention.linear_qkv", "attention.query_key_value"),
    ("self_attention.linear_proj", "attention.dense"),
    ("pre_mlp_layernorm", "post_attention_layernorm"),
    ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
    ("mlp.linear_fc2", "mlp.dense_4h_to_h"),
)
_TOP_MAP = (
    ("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight"),
    ("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight"),
    ("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias"),
    ("output_layer.weight", "embed_out.weight"),
)


class ExportError(ValueError):
    """An export or import cannot be done as asked; the message names the file or setting."""


# -------------------------------------------------------------------------------------------------- weights
def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> GPT-NeoX's, for every parameter of a TP=1/PP=1 model of shape ``cfg``."""
    out = dict(_TOP_MAP)
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_MAP:
            for kind in ("weight", "bias"):
                out[f"decoder.layers.{i}.{ours}.{kind}"] = f"gpt_neox.layers.{i}.{theirs}.{kind}"
    return out


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-NeoX tensors from our TP=1 state dict (``_extra_state`` entries ignored); tensors are copied unchanged
    (see the module docstring for why the QKV and rotary layouts need no permutation)."""
    names = name_map(cfg)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ExportError(f"model state does not match preset {cfg.preset!r}: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    return {names[k]: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def from_hf_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our parameter tensors from GPT-NeoX ones (the inverse of :func:`to_hf_state`); ``source`` names the file."""
    names = name_map(cfg)
    inverse = {v: k for k, v in names.items()}
    if "lm_head.weight" in tensors and "embed_out.weight" not in tensors:  # transformers 5's own name
        tensors = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in tensors.items()}
    ignored = {k for k in tensors if k.endswith((".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"))}
    missing = sorted(set(inverse) - set(tensors))
    extra = sorted(set(tensors) - set(inverse) - ignored)
    if missing or extra:
        raise ExportError(f"{source}: tensors do not match a GPT-NeoX of {cfg.num_layers} layers: missing "
                          f"{missing[:5]}, unexpected {extra[:5]}")
    return {inverse[k]: v for k, v in tensors.items() if k in inverse}


# --------------------------------------------------------------------------------------------------- config
def hf_config(cfg: ModelConfig, *, bos: int, eos: int, pad: int | None = None) -> dict:
    """``config.json`` of a GPT-NeoX equal to our model of shape ``cfg`` (keys of transformers 4 and 5)."""
    from megatron_bliss.config import to_dict

    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.padded_vocab_size(1),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": "gelu",
        "rotary_pct": cfg.rotary_percent,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_percent},
        "attention_dropout": cfg.attention_dropout,
        "hidden_dropout": cfg.hidden_dropout,
        "max_position_embeddings": cfg.seq_length,
        "initializer_range": cfg.init_method_std,
        "layer_norm_eps": cfg.layernorm_epsilon,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": False,
        "use_parallel_residual": False,
        "attention_bias": True,
        "torch_dtype": "float32",
        CONFIG_KEY: to_dict(cfg),
    }


def model_config_from_hf(config: dict, source: str, preset: str | None = None,
                         overrides: dict | None = None) -> ModelConfig:
    """Our :class:`ModelConfig` of a GPT-NeoX ``config.json`` (``source`` names it in errors).

    An export of ours carries its config (``megatron_bliss_model``); for any other GPT-NeoX the shape is read from
    the HF keys, starting from ``preset`` when given, with the vocabulary taken as the padded one. ``overrides``
    (``--model.key=value``) win.
    """
    from megatron_bliss.config import from_dict

    if config.get("model_type") != "gpt_neox":
        raise ExportError(f"{source}: model_type is {config.get('model_type')!r}, only 'gpt_neox' can be imported")
    if config.get("use_parallel_residual", True):
        raise ExportError(
            f"{source}: use_parallel_residual is true (x + attn(ln1(x)) + mlp(ln2(x)), as in the published Pythia "
            "models), but our blocks are sequential (x + attn(ln1(x)), then + mlp(ln2(.))): megatron-core has no "
            "parallel residual, so these weights would compute another function; only use_parallel_residual=false "
            "configs can be imported")
    for key, want in (("hidden_act", "gelu"), ("tie_word_embeddings", False)):
        if config.get(key, want) != want:
            raise ExportError(f"{source}: {key}={config.get(key)!r}, our GPTs need {key}={want!r}")
    if config.get("attention_bias", True) is not True:
        raise ExportError(f"{source}: attention_bias=false, our GPTs have biased linear layers")
    rope = config.get("rope_parameters") or {}
    values = dict(config.get(CONFIG_KEY) or {})
    if not values:
        vocab = config["vocab_size"]
        values = {"preset": preset or "imported", "vocab_size": vocab,
                  "make_vocab_size_divisible_by": 128 if vocab % 128 == 0 else 1,
                  "seq_length": config.get("max_position_embeddings", 2048)}
        if preset:
            values = {**ModelConfig.config_defaults({"preset": preset}), **values}
    hf_shape = {
        "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"], "ffn_hidden_size": config["intermediate_size"],
        "rotary_percent": rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25)),
        "rotary_base": int(rope.get("rope_theta", config.get("rotary_emb_base", 10000))),
        "layernorm_epsilon": config.get("layer_norm_eps", 1e-5),
    }
    for key, value in hf_shape.items():
        if key in values and values[key] != value and config.get(CONFIG_KEY):
            raise ExportError(f"{source}: {CONFIG_KEY}.{key}={values[key]!r} disagrees with the GPT-NeoX keys "
                              f"({value!r})")
        values[key] = value
    values.update(overrides or {})
    cfg = from_dict(ModelConfig, values, source)
    if cfg.padded_vocab_size(1) != config["vocab_size"]:
        raise ExportError(f"{source}: vocab_size {config['vocab_size']} is not model.vocab_size={cfg.vocab_size} "
                          f"padded to a multiple of model.make_vocab_size_divisible_by="
                          f"{cfg.make_vocab_size_divisible_by} ({cfg.padded_vocab_size(1)})")
    return cfg


# ------------------------------------------------------------------------------------------------ tokenizer
def sentencepiece_to_tokenizers(model_path: str):
    """A ``tokenizers.Tokenizer`` giving the ids of SentencePiece BPE model ``model_path`` (no bos/eos added).

    The BPE vocabulary and merges come from the model's pieces (a merge for each piece that splits into two pieces,
    ranked by the merged piece's id, as SentencePiece ranks BPE pieces by score); the dummy prefix and whitespace
    escaping become normalizers, byte fallback the model's ``byte_fallback``. User-defined pieces (e.g. ``\\n``) are
    single characters no merge contains, so BPE keeps them whole as SentencePiece does.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ExportError(f"{model_path}: only SentencePiece BPE models can be exported "
                          f"(model_type {trainer.model_type})")
    if trainer.treat_whitespace_as_suffix:
        raise ExportError(f"{model_path}: treat_whitespace_as_suffix is not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for piece, pid in vocab.items():
        kind = proto.pieces[pid].type
        if kind not in (1,):  # NORMAL pieces only: control, unknown, user-defined and byte pieces are not merged
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = proto.pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    tok = Tokenizer(BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback=trainer.byte_fallback))
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix
                                                         else []))
    return tok


def write_tokenizer(tokenizer_path: str, out_dir: str, model_max_length: int) -> dict:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer.from_pretrained(out_dir)``;
    returns ``{"eos", "bos", "pad", "vocab_size", "kind", "sha256"}`` of our tokenizer."""
    from megatron_bliss.data.tokenizer import build_tokenizer, tokenizer_info

    ours = build_tokenizer(tokenizer_path)
    info = tokenizer_info(ours)
    special = {}
    if ours.kind == "sentencepiece":
        from sentencepiece import SentencePieceProcessor

        tok = sentencepiece_to_tokenizers(ours.path)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        sp = SentencePieceProcessor(model_file=ours.path)
        for name, pid in (("unk_token", sp.unk_id()), ("bos_token", ours.bos), ("eos_token", ours.eod),
                          ("pad_token", ours.pad)):
            if pid is not None and pid >= 0:
                special[name] = sp.id_to_piece(pid)
    else:
        shutil.copyfile(ours.path, os.path.join(out_dir, "tokenizer.json"))
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(ours.path)
        special["eos_token"] = tok.id_to_token(ours.eod)
        if ours.pad >= 0:
            special["pad_token"] = tok.id_to_token(ours.pad)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **special}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"eos": ours.eod, "bos": ours.bos if ours.bos >= 0 else ours.eod,
            "pad": ours.pad if ours.pad >= 0 else None, "vocab_size": ours.vocab_size, "kind": ours.kind,
            "sha256": info["sha256"], "path": ours.path}


# ----------------------------------------------------------------------------------------------- model card
def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("%s: not read for the model card (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def run_facts(checkpoint: str, meta: dict, run_dir: str | None) -> dict:
    """What the model card says about where the weights come from: step, tokens seen, method, round, checksums.

    Whatever is present is used: the checkpoint's step, the training config (``config.yaml`` beside the checkpoint's
    ``iter_*`` directory) for tokens seen, and a pipeline run's ``config.yaml`` and ``manifest.json``.
    """
    facts: dict = {"checkpoint": os.path.abspath(checkpoint)}
    if meta.get("step") is not None:
        facts["step"] = int(meta["step"])
    train_cfg = {}
    for candidate in (os.path.dirname(os.path.abspath(checkpoint)), os.path.abspath(checkpoint)):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            train_cfg = _read_yaml(os.path.join(candidate, "config.yaml"))
            break
    gbs = (train_cfg.get("train") or {}).get("global_batch_size")
    seq = (train_cfg.get("model") or {}).get("seq_length")
    if "step" in facts and isinstance(gbs, int) and isinstance(seq, int):
        facts["tokens_seen"] = facts["step"] * gbs * seq
        facts["global_batch_size"], facts["seq_length"] = gbs, seq
    found = re.search(r"round(\d+)", os.path.abspath(checkpoint))
    if found:
        facts["round"] = int(found.group(1))
    if run_dir:
        cfg = _read_yaml(os.path.join(run_dir, "config.yaml")) if os.path.isfile(
            os.path.join(run_dir, "config.yaml")) else {}
        run = cfg.get("run") or {}
        if run.get("method"):
            facts["method"] = run["method"]
        if run.get("rounds") is not None:
            facts["rounds"] = run["rounds"]
        manifest_path = os.path.join(run_dir, "manifest.json")
        if os.path.isfile(manifest_path):
            try:
                with open(manifest_path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as exc:
                logger.warning("%s: not read for the model card (%s)", manifest_path, exc)
                manifest = {}
            inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
            if isinstance(inputs, dict):
                facts["data_checksums"] = {str(k): str(v) for k, v in sorted(inputs.items())}
            if isinstance(manifest, dict) and manifest.get("config_hash"):
                facts["config_hash"] = manifest["config_hash"]
            phases = manifest.get("phases") if isinstance(manifest, dict) else None
            if isinstance(phases, dict) and "round" in facts:  # the round's evaluation branch and its harness run
                branch = (phases.get(f"round{facts['round']}/eval") or {}).get("info") or {}
                harness = (phases.get(f"round{facts['round']}/lm_eval") or {}).get("info") or {}
                if branch.get("val_loss") is not None:
                    facts["val_loss"] = float(branch["val_loss"])
                if harness.get("lm_eval"):
                    facts["lm_eval"] = harness["lm_eval"]
        facts["run_dir"] = os.path.abspath(run_dir)
    return facts


def model_card(cfg: ModelConfig, facts: dict, tokenizer: dict) -> str:
    """The export's ``README.md``."""
    from megatron_bliss.models.presets import num_parameters

    lines = [f"# {cfg.preset} (megatron_bliss export)", "",
             "A GPT-NeoX-shaped model trained with megatron_bliss on megatron-core, exported to Hugging Face "
             "`GPTNeoXForCausalLM`. Its blocks are sequential (`use_parallel_residual=false`), unlike the published "
             "Pythia models.", "", "## Shape", "",
             f"- preset: `{cfg.preset}`; layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads "
             f"{cfg.num_attention_heads}, MLP {cfg.ffn_hidden_size}",
             f"- vocabulary: {cfg.vocab_size} tokens, padded to {cfg.padded_vocab_size(1)} rows",
             f"- context: {cfg.seq_length} tokens; rotary on {cfg.rotary_percent:g} of each head (base "
             f"{cfg.rotary_base})",
             f"- parameters: {num_parameters(cfg):,}", "", "## Training", ""]
    labels = (("step", "step"), ("tokens_seen", "tokens seen"), ("method", "selection method"),
              ("round", "round"), ("rounds", "rounds of the run"), ("config_hash", "run config hash"),
              ("run_dir", "run directory"), ("checkpoint", "checkpoint"))
    for key, label in labels:
        if key in facts:
            value = f"{facts[key]:,}" if isinstance(facts[key], int) and key == "tokens_seen" else facts[key]
            lines.append(f"- {label}: {value}")
    if "tokens_seen" in facts:
        lines.append(f"  ({facts['step']} steps x {facts['global_batch_size']} sequences x "
                     f"{facts['seq_length']} tokens)")
    if "val_loss" in facts or "lm_eval" in facts:
        from megatron_bliss.eval.run import markdown_table

        lines += ["", f"## Evaluation (round {facts['round']}'s evaluation branch)", ""]
        if "val_loss" in facts:
            lines += [f"- validation loss: {facts['val_loss']:.4f} nats/token (the run's validation set)", ""]
        if "lm_eval" in facts:
            lines += ["lm-evaluation-harness, percent:", "", markdown_table(facts["lm_eval"]).rstrip()]
    if facts.get("data_checksums"):
        lines += ["", "## Data (sha256 of the run's inputs)", ""]
        lines += [f"- `{k}`: `{v}`" for k, v in facts["data_checksums"].items()]
    lines += ["", "## Tokenizer", "", f"- {tokenizer['kind']}, {tokenizer['vocab_size']} ids, sha256 "
              f"`{tokenizer['sha256']}`; end of document = id {tokenizer['eos']}; no BOS/EOS added when encoding",
              "", f"Exported {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- directories
def _prepare_output(output: str, overwrite: bool) -> str:
    """A fresh temporary directory beside ``output``; refuses a non-empty ``output`` without ``overwrite``."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp", dir=parent)


def _move_into_place(tmp: str, output: str) -> None:
    output = os.path.abspath(output)
    if os.path.isdir(output):
        old = tempfile.mkdtemp(prefix=os.path.basename(output) + ".old", dir=os.path.dirname(output))
        os.rmdir(old)
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


def _single_process() -> None:
    """megatron-core at TP=1/PP=1 in this process (kept as it is when already so)."""
    from megatron_bliss import parallel

    if parallel._current_layout() in ((1, 1, None), (1, 1, 1)):
        return
    parallel.initialize(parallel.ParallelConfig())


# --------------------------------------------------------------------------------------------------- export
def checkpoint_model_config(checkpoint: str, preset: str | None = None, overrides: dict | None = None,
                            config_path: str | None = None) -> ModelConfig:
    """The model config to export ``checkpoint`` with: the one saved in it, or a run's ``--config`` model section;
    ``preset`` must agree with it and ``overrides`` (``--model.key=value``) win."""
    from megatron_bliss import checkpointing as ckpt
    from megatron_bliss.config import from_dict, to_dict

    if config_path:
        section = _read_yaml(config_path).get("model")
        if not isinstance(section, dict):
            raise ExportError(f"--config {config_path}: no model section")
        values = dict(section)
    else:
        values = to_dict(ckpt.model_config(checkpoint))
    if preset is not None:
        if values.get("preset") not in (None, preset):
            raise ExportError(f"--preset {preset!r} but the checkpoint {checkpoint} was saved from preset "
                              f"{values.get('preset')!r}")
        values.setdefault("preset", preset)
    values.update(overrides or {})
    return from_dict(ModelConfig, values, config_path or checkpoint)


def export_hf(checkpoint: str, output: str, tokenizer_model: str, *, cfg: ModelConfig | None = None,
              run_dir: str | None = None, overwrite: bool = False) -> str:
    """Writes checkpoint ``checkpoint`` (any layout) as a GPT-NeoX directory ``output``; returns its path.

    The directory is written to a temporary sibling and renamed into place, so ``output`` is either absent, the old
    export (``overwrite``) or the finished new one.
    """
    from safetensors.torch import save_file

    from megatron_bliss import checkpointing as ckpt
    from megatron_bliss.models.gpt import build_gpt

    checkpoint = ckpt.resolve(checkpoint)
    cfg = cfg or checkpoint_model_config(checkpoint)
    cfg = dataclasses.replace(cfg, attention_backend="local")
    _single_process()
    model = build_gpt(cfg, attention_backend="local")
    meta = ckpt.load_model(checkpoint, model, cfg)
    tensors = to_hf_state(model.state_dict(), cfg)
    tmp = _prepare_output(output, overwrite)
    try:
        tokenizer = write_tokenizer(tokenizer_model, tmp, cfg.seq_length)
        if tokenizer["vocab_size"] != cfg.vocab_size:
            raise ExportError(f"--tokenizer-model {tokenizer_model} has {tokenizer['vocab_size']} ids but the "
                              f"model's model.vocab_size is {cfg.vocab_size}")
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        config = hf_config(cfg, bos=tokenizer["bos"], eos=tokenizer["eos"], pad=tokenizer["pad"])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        generation = {"bos_token_id": tokenizer["bos"], "eos_token_id": tokenizer["eos"],
                      "pad_token_id": tokenizer["pad"] if tokenizer["pad"] is not None else tokenizer["eos"]}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(cfg, run_facts(checkpoint, meta, run_dir), tokenizer))
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s to %s", checkpoint, output)
    return os.path.abspath(output)


# --------------------------------------------------------------------------------------------------- import
def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` of a GPT-NeoX directory (``model.safetensors`` or its shards)."""
    from safetensors.torch import load_file

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    with open(config_path) as f:
        config = json.load(f)
    files = [os.path.join(hf_dir, WEIGHTS_FILE)]
    index = os.path.join(hf_dir, WEIGHTS_FILE + ".index.json")
    if not os.path.isfile(files[0]) and os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if not os.path.isfile(path):
            raise ExportError(f"{hf_dir}: no {os.path.basename(path)} (only safetensors weights are imported)")
        tensors.update(load_file(path))
    return config, tensors


def import_hf(hf_dir: str, output: str, *, preset: str | None = None, overrides: dict | None = None,
              overwrite: bool = False) -> str:
    """Writes GPT-NeoX directory ``hf_dir`` as our target checkpoint ``output`` (``save_model(role="target")``),
    a starting point for pretraining (``paths.load`` with ``checkpoint.load_weights_only=true``)."""
    from megatron_bliss import checkpointing as ckpt
    from megatron_bliss.models.gpt import build_gpt

    config_path = os.path.join(hf_dir, "config.json")
    config, tensors = read_hf_dir(hf_dir)
    cfg = model_config_from_hf(config, config_path, preset, overrides)
    ours = from_hf_state(tensors, cfg, hf_dir)
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    _single_process()
    model = build_gpt(dataclasses.replace(cfg, attention_backend="local"), attention_backend="local")
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = ours[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ExportError(f"{hf_dir}: {name_map(cfg)[name]} has shape {tuple(value.shape)}, the model of "
                                  f"preset {cfg.preset!r} needs {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    if os.path.isdir(output) and overwrite:
        shutil.rmtree(output)
    ckpt.save_model(output, model, cfg, "target", {"imported_from": os.path.abspath(hf_dir)})
    logger.info("imported %s to %s", hf_dir, output)
    return output


# ------------------------------------------------------------------------------------------------------ CLIs
def _overrides(rest: list[str], parser) -> dict:
    from megatron_bliss.config import ConfigError, parse_overrides

    try:
        values = parse_overrides(rest)
    except ConfigError as exc:
        parser.error(str(exc))
    bad = [k for k in values if k != "model"]
    if bad:
        parser.error(f"only --model.key=value overrides are accepted, got --{bad[0]}...")
    return values.get("model", {})


def _run(fn) -> int:
    from megatron_bliss.checkpointing import CheckpointError
    from megatron_bliss.config import ConfigError
    from megatron_bliss.data.commands import setup_logging

    setup_logging()  # the data tools' logging: the root logger, so the package's records reach any handler there
    try:
        fn()
    except (ExportError, CheckpointError, ConfigError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``tools/export_hf.py``: a checkpoint -> a Hugging Face GPT-NeoX directory."""
    import argparse

    parser = argparse.ArgumentParser(description="Export a megatron_bliss checkpoint (any TP/PP layout) as a Hugging "
                                     "Face GPTNeoXForCausalLM directory. Extra --model.key=value arguments override "
                                     "the saved model config.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, or a save_dir (its latest)")
    parser.add_argument("--preset", help="model preset; must match the one the checkpoint was saved from")
    parser.add_argument("--config", help="the run's config.yaml, whose model section replaces the saved config")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or tokenizer.json")
    parser.add_argument("--output", required=True, help="export directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--run-dir", help="pipeline run directory (method, round, data checksums for the card)")
    args, rest = parser.parse_known_args(argv)
    overrides = _overrides(rest, parser)

    def go():
        from megatron_bliss import checkpointing as ckpt

        path = ckpt.resolve(args.checkpoint)
        cfg = checkpoint_model_config(path, args.preset, overrides, args.config)
        export_hf(path, args.output, args.tokenizer_model, cfg=cfg, run_dir=args.run_dir, overwrite=args.overwrite)

    return _run(go)


def import_main(argv: list[str] | None = None) -> int:
    """``tools/import_hf.py``: a Hugging Face GPT-NeoX directory (``use_parallel_residual=false``) -> a target
    checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(description="Import a Hugging Face GPT-NeoX directory with "
                                     "use_parallel_residual=false as a megatron_bliss target checkpoint. Extra "
                                     "--model.key=value arguments override the model config read from it.")
    parser.add_argument("--hf-dir", required=True, help="directory with config.json and model.safetensors")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--preset", help="preset to start from when config.json has no megatron_bliss_model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args, rest = parser.parse_known_args(argv)
    overrides = _overrides(rest, parser)
    return _run(lambda: import_hf(args.hf_dir, args.output, preset=args.preset, overrides=overrides,
                                  overwrite=args.overwrite))
