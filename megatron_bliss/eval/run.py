"""One evaluation of a target checkpoint: its config, the lm-evaluation-harness run, and the written results.

Runs ``lm_eval.simple_evaluate`` with :class:`~megatron_bliss.eval.lm_eval.MegatronBlissLM` and writes
``results.json`` (everything the harness returned but per-sample logs, plus the summary), ``results.md`` (acc and
acc_norm per task, the reported metric and their mean) and the resolved ``config.yaml`` into ``output_dir``, each
written under a temporary name and renamed. Needs ``pip install megatron_bliss[eval]``; see docs/eval.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_bliss.data.tokenizer import DEFAULT_TOKENIZER
from megatron_bliss.models.presets import ModelConfig

logger = logging.getLogger(__name__)

BLISS_TASKS = ("sciq", "arc_easy", "arc_challenge", "logiqa", "openbookqa", "boolq", "hellaswag", "piqa",
               "winogrande")
"""The paper's nine zero-shot tasks (lm-evaluation-harness names)."""


@dataclass
class EvalPaths:
    """The files an evaluation reads and writes (the ``paths`` section)."""

    lock_field = "output_dir"
    """The directory a launch locks while it runs (a second launch on it is refused, naming the holder)."""

    checkpoint: str = ""
    """Target checkpoint: an ``iter_*`` directory or a save_dir (its latest), e.g. a round's ``eval`` branch."""
    tokenizer: str = DEFAULT_TOKENIZER
    """The tokenizer the target was trained with (SentencePiece ``.model`` or ``tokenizer.json``)."""
    output_dir: str = ""
    """Where results.json, results.md and config.yaml go (not inside a pipeline run's checkpoint directories)."""
    include_path: str | None = None
    """Directory of extra task YAMLs (local datasets, or stock tasks pointed at local files)."""


@dataclass
class HarnessConfig:
    """How lm-evaluation-harness scores a target: the pipeline's ``eval`` section, and the base of
    :class:`EvalConfig`."""

    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names; empty runs no harness evaluation (the pipeline's default)."""
    num_fewshot: int = 0
    """Few-shot examples per prompt (BLISS: zero-shot)."""
    batch_size: int = 16
    """Sequences per forward when scoring."""
    limit: float | None = None
    """Examples per task (a fraction when below 1); for smoke tests only, the scores are then not comparable."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 | fp32."""
    add_eod_prefix: bool = True
    """Precede every context with the end-of-document id, as a document's first token is in pretraining."""

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto|bf16|fp32, got {self.precision!r}")
        if self.batch_size < 1 or self.num_fewshot < 0:
            raise ValueError("batch_size must be >= 1 and num_fewshot >= 0")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"limit must be > 0 (a count, or a fraction below 1), got {self.limit}")


@dataclass
class EvalConfig(HarnessConfig):
    """One evaluation of one target checkpoint."""

    tasks: list[str] = field(default_factory=lambda: list(BLISS_TASKS))
    """lm-evaluation-harness task names (default: the nine BLISS tasks)."""
    model: ModelConfig | None = None
    """Target shape; unset uses the config saved in the checkpoint."""
    device: str = "auto"
    """auto | cpu | cuda; cpu hides the GPUs from this process."""
    download_only: bool = False
    """Only load the tasks' datasets (filling the Hugging Face cache for a later offline run), then stop."""
    overwrite: bool = False
    """Replace the results already in ``paths.output_dir`` (otherwise such a directory is refused)."""

    def __post_init__(self):
        super().__post_init__()
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if not self.tasks:
            raise ValueError("tasks must not be empty")


def summarize(results: dict, tasks: Sequence[str]) -> dict:
    """Per task: acc and acc_norm (with stderr) where present, the reported metric (acc_norm where the task has
    it, else acc) and the unweighted mean of the reported values over the tasks that have one."""
    rows = {}
    for task in tasks:
        r = results.get(task, {})
        row = {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        row.update({f"{m}_stderr": r[f"{m}_stderr,none"] for m in ("acc", "acc_norm") if f"{m}_stderr,none" in r})
        row["metric"] = "acc_norm" if "acc_norm" in row else "acc" if "acc" in row else None
        row["value"] = row.get(row["metric"]) if row["metric"] else None
        rows[task] = row
    values = [row["value"] for row in rows.values() if row["value"] is not None]
    return {"tasks": rows, "mean": sum(values) / len(values) if values else None, "num_tasks": len(values)}


def markdown_table(summary: dict, n_samples: dict | None = None) -> str:
    """Percent, as the paper reports them; the reported metric of each task in the last column."""
    def pct(row, m):
        if m not in row:
            return "-"
        err = row.get(f"{m}_stderr")
        return f"{100 * row[m]:.2f}" + (f" ± {100 * err:.2f}" if isinstance(err, (int, float)) else "")

    lines = ["| task | n | acc | acc_norm | reported |", "|---|---:|---:|---:|---:|"]
    for task, row in summary["tasks"].items():
        n = (n_samples or {}).get(task, {}).get("effective", "")
        value = f"{100 * row['value']:.2f} ({row['metric']})" if row["value"] is not None else "-"
        lines.append(f"| {task} | {n} | {pct(row, 'acc')} | {pct(row, 'acc_norm')} | {value} |")
    mean = f"**{100 * summary['mean']:.2f}**" if summary["mean"] is not None else "-"
    lines.append(f"| **mean ({summary['num_tasks']} tasks)** | | | | {mean} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _dataset_errors():
    """A task dataset that cannot be fetched ends the run with what to do instead of a traceback."""
    try:
        yield
    except ConnectionError as exc:
        raise SystemExit(f"{exc}\nA task's dataset is neither reachable nor cached. {OFFLINE_HINT}") from None


OFFLINE_HINT = ("Fill the Hugging Face cache on a connected machine (python -m megatron_bliss.eval "
                "--download_only=true --tasks=[...]), copy it and set HF_HOME to it with HF_HUB_OFFLINE=1 and "
                "HF_DATASETS_OFFLINE=1, or point the task at local files with an include path; see docs/eval.md.")


def _task_manager(include_path: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-evaluation-harness is not installed: pip install 'megatron_bliss[eval]'") from None
    return TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | None = None, setting: str = "tasks") -> None:
    """Loads each task with its dataset (from the Hugging Face cache, or downloaded where allowed); the check a
    run makes before any model is built or trained.

    Raises:
        ValueError: naming ``setting``, the task, the dataset and the offline cache variables, for an unknown task
            or a dataset that is neither cached nor reachable.
    """
    manager = _task_manager(include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or under {include_path}" if include_path else ""
        raise ValueError(f"{setting}: {', '.join(unknown)} is not an lm-evaluation-harness task{where}")
    for task in tasks:
        try:
            manager.load([task])
        except (ConnectionError, FileNotFoundError) as exc:
            raise ValueError(f"{setting}: task {task!r} reads a dataset that is neither in the local Hugging Face "
                             f"cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) nor reachable: "
                             f"{exc}. {OFFLINE_HINT}") from None


def _cache_key(checkpoint: str, cfg: HarnessConfig, tokenizer_path: str) -> str:
    """What a cached request result depends on besides the request: the checkpoint's files, the tokenizer and the
    scoring settings. A cache under another key is never read."""
    import hashlib

    stats = {name: os.stat(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint)}
    files = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats.items())
    record = [os.path.abspath(checkpoint), files, os.path.abspath(tokenizer_path), cfg.batch_size, cfg.precision,
              cfg.add_eod_prefix]
    return hashlib.sha256(json.dumps(record, default=str).encode()).hexdigest()[:16]


RESULT_FILES = ("results.json", "results.md", "config.yaml")
"""What :func:`run_eval` writes into ``paths.output_dir``."""


def run_eval(cfg: HarnessConfig, paths: EvalPaths) -> dict | None:
    """Evaluates ``paths.checkpoint`` on ``cfg.tasks`` and writes the results; returns the summary (None when
    ``download_only``).

    Under ``torchrun`` every rank holds the model and scores its share of the requests (data-parallel); rank 0
    writes. Each rank's finished requests go to ``output_dir/cache/`` as they are scored, so a killed evaluation
    rerun resumes where it stopped; the cache is removed once the results are written.
    """
    from megatron_bliss import parallel

    download_only = getattr(cfg, "download_only", False)
    if not download_only and not (paths.checkpoint and paths.output_dir):
        raise ValueError("set paths.checkpoint and paths.output_dir (or download_only=true)")
    existing = [name for name in RESULT_FILES if os.path.exists(os.path.join(paths.output_dir or "", name))]
    if existing and not download_only and not getattr(cfg, "overwrite", True):
        raise ValueError(f"paths.output_dir {paths.output_dir} already holds {', '.join(existing)}: choose another "
                         "directory, or pass --overwrite=true to replace them")
    if download_only:
        check_tasks(cfg.tasks, paths.include_path)
        logger.info("datasets of %s are in the Hugging Face cache", ", ".join(cfg.tasks))
        return None
    import lm_eval

    from megatron_bliss.checkpointing import resolve
    from megatron_bliss.config import dump, to_dict
    from megatron_bliss.eval.lm_eval import MegatronBlissLM, load_target

    task_manager = _task_manager(paths.include_path)
    model, tokenizer, model_cfg, autocast_dtype = load_target(
        paths.checkpoint, getattr(cfg, "model", None), tokenizer_path=paths.tokenizer,
        device=getattr(cfg, "device", None), precision=cfg.precision)
    lm = MegatronBlissLM(model, tokenizer, model_cfg.seq_length, cfg.batch_size, add_eod_prefix=cfg.add_eod_prefix,
                         vocab_size=model_cfg.vocab_size, autocast_dtype=autocast_dtype,
                         progress=parallel.is_rank0())
    checkpoint = resolve(paths.checkpoint)
    cache_dir = os.path.join(paths.output_dir, "cache")
    key = _cache_key(checkpoint, cfg, tokenizer.path)
    if parallel.is_rank0() and os.path.isdir(cache_dir):  # another checkpoint's or setting's requests
        for name in os.listdir(cache_dir):
            if not name.startswith(key):
                os.remove(os.path.join(cache_dir, name))
    parallel.barrier()
    with _dataset_errors():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=task_manager, log_samples=False,
                                      use_cache=os.path.join(cache_dir, key))
    summary = None
    if parallel.is_rank0():
        summary = summarize(out["results"], cfg.tasks)
        os.makedirs(paths.output_dir, exist_ok=True)
        dump(cfg, os.path.join(paths.output_dir, "config.yaml"), paths=paths)
        record = {"summary": summary, "checkpoint": os.path.abspath(checkpoint), "model": to_dict(model_cfg),
                  "tokenizer": tokenizer.path, "lm_eval_version": getattr(lm_eval, "__version__", None),
                  "world_size": parallel.world_size(), **{k: v for k, v in out.items() if k != "samples"}}
        _write_atomic(os.path.join(paths.output_dir, "results.json"), json.dumps(record, indent=1, default=str))
        _write_atomic(os.path.join(paths.output_dir, "results.md"), markdown_table(summary, out.get("n-samples")))
        logger.info("mean %s over %d tasks; %s/results.md", summary["mean"], summary["num_tasks"], paths.output_dir)
    parallel.barrier()
    if parallel.is_rank0():
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)
    if parallel.world_size() > 1:
        import torch.distributed as dist

        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary
