"""The dry run (``--run.dry_run=true`` of every stage and of the pipeline): what each phase holds per GPU and computes.

Nothing is trained and no data is read beyond a dataset's index (for the number of sequences a phase scores, when
the index exists). Each phase's models are built as megatron-core builds them for one rank of the configured layout,
on the meta device (shapes only, no memory), under torch's in-process ``fake`` process-group backend: no other
process, no communication, and the group is destroyed before the plan is printed. One model per pipeline stage is
built (every tensor-parallel rank of a stage holds the same shapes); the parameter counts come from those models,
the bytes from the rules below, stated again in the printed plan:

- Training in bf16 (``train.precision`` ``auto`` or ``bf16``; the plan is for GPUs): 2 bytes of bf16 weights + 4 of
  fp32 gradient buffer + 12 of fp32 main params and Adam m and v per parameter; the distributed optimizer divides
  the 12 by the data-parallel size. fp32: 4 + 4 + 8 (Adam m, v; the weights are the main params).
- Activations of a training forward (Korthikanti et al., 2022, without sequence parallelism): per layer
  ``s·b·h·(10 + 24/t)`` bytes in bf16 (34·s·b·h at t = 1) for s positions, micro-batch b, width h and TP size t,
  plus ``5·a·s²·b/t`` for unfused (``local``) attention's score matrices; fp32 doubles them. A pipeline stage k of
  p holds ``min(p − k, micro-batches)`` micro-batches in flight under 1F1B (the interleaved schedule:
  × (1 + (p − 1)/(p·v))); full recomputation keeps ``2·s·b·h`` bytes per layer plus one layer's activations.
- Logits: 10 bytes per (position, vocabulary row) in bf16 training (the logits, their fp32 copy in the
  cross-entropy and its gradient), 12 in fp32.

The bilevel round (fp32 throughout: central-difference products need fp32 weights) holds the trained proxy and score
model at 16 bytes per parameter (weights, gradients, AdamW m and v), the frozen target that supplies the KL logits
at 4, and proxy-sized solver vectors (:data:`SOLVER_VECTORS`, plus the validation gradient) at 4 each.

Steps, tokens and FLOPs are the pipeline's own arithmetic (:func:`megatron_bliss.pipeline.rounds._lm_flops`,
``BlissPipeline._bilevel_flops`` and :func:`megatron_bliss.pipeline.rounds.score_flops`);
phases the pipeline builds are built by its own config builders, so the plan is of the configurations the phases
will run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

GIB = 2 ** 30
"""Bytes per GiB: ``--run.gpu_memory_gb`` and the printed plan count in GiB, as nvidia-smi does."""
ACTIVATION_BYTES_PER_SBH = (10, 24)
"""Korthikanti et al. (2022): a layer keeps ``s·b·h·(10 + 24/t)`` bytes of bf16 activations (34·s·b·h at TP 1)."""
ATTENTION_SCORE_BYTES = 5
"""Unfused attention adds ``5·a·s²·b/t`` bytes per layer (scores, softmax, dropout mask)."""
LOGIT_BYTES = {"bf16": 10, "fp32": 12}
"""Bytes per (position, vocabulary row) of a training step's output layer."""
BILEVEL_LOGIT_BYTES = 20
"""The bilevel round's loss: the proxy's fp32 logits, log-softmax and gradient (12) and the target's fp32 logits
and probabilities (8), per (position, vocabulary row)."""
EXACT_HVP_GRAPH = 3
"""Activation multiple of an exact (double-backward) product over one forward-backward graph (measured 2.2-2.9x on
an H100 at Pythia-410M shape, docs/bilevel.md); central differences keep one graph at a time (1x)."""
SOLVER_VECTORS = {"sgd": 2, "cg": 4, "amortized": 3}
"""Proxy-sized fp32 vectors each z-solver keeps (sgd: z, v; cg: z, r, p, Hp; amortized: z, Hz, residual)."""


@dataclass
class DryRunOptions:
    """The ``--run.*`` flags every stage accepts for a dry run (taken out of the command line before parsing)."""

    dry_run: bool = False
    """Print the plan (models, memory per GPU, steps, tokens, FLOPs) and exit without running."""
    gpu_memory_gb: float | None = None
    """GiB per GPU the plan must fit in (exit 1 naming the phase otherwise); None: the local GPU's, else no limit."""
    world_size: int | None = None
    """GPUs the plan is for; None: torchrun's WORLD_SIZE, else 8 (one node, as the example configs are written)."""

    def __post_init__(self):
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise ValueError(f"run.gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"run.world_size must be >= 1, got {self.world_size}")

    def resolved_world_size(self) -> int:
        """The number of GPUs to plan for."""
        return self.world_size or int(os.environ.get("WORLD_SIZE", "8"))

    def resolved_limit_gb(self) -> float | None:
        """The memory limit in GiB: the flag's, else the local GPU's, else None."""
        if self.gpu_memory_gb is not None:
            return self.gpu_memory_gb
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
        return None


@dataclass
class RankMemory:
    """Estimated bytes one rank holds during a phase."""

    ranks: str
    """Which ranks (e.g. ``0-7``, or ``pp stage 1: 4-7``)."""
    parameters: int
    """Parameters of this rank's shard of the model(s) it trains or runs."""
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    other: float = 0.0
    """Logits, a frozen model's weights, solver vectors."""

    @property
    def peak(self) -> float:
        """The sum: every term is live at once at the peak of a step."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.other


@dataclass
class PhasePlan:
    """One phase of a stage or of the schedule."""

    key: str
    """The manifest key (``round1/bilevel``) or the stage's name."""
    kind: str
    """``pretrain``, ``selection`` or ``eval``, as the pipeline's report splits FLOPs."""
    what: str
    """A line saying what runs, on which layout and in which precision."""
    steps: int
    tokens: int
    flops: float
    memory: list[RankMemory] = field(default_factory=list)
    """One entry per distinct rank position; empty for a phase that runs on the CPU."""
    same_as: str | None = None
    """An earlier phase of the plan whose models and memory this one repeats."""

    @property
    def peak(self) -> float:
        """The largest rank's estimate (0 for a CPU phase)."""
        return max((m.peak for m in self.memory), default=0.0)

    def worst(self) -> RankMemory | None:
        """The rank with the largest estimate."""
        return max(self.memory, key=lambda m: m.peak, default=None)


# --------------------------------------------------------------------------------------------- models on meta
@contextmanager
def _rank_of_layout(world: int, tp: int, pp: int, vpp: int | None, rank: int):
    """megatron-core's parallel state of global ``rank`` of a layout, in this process alone (torch's ``fake``
    backend: no other process and no communication), torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a dry run builds its models outside a running job: torch.distributed is initialized")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp, create_gloo_process_groups=False)
        yield ps
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


@contextmanager
def _meta_models():
    """Builds on the meta device; the builders' move to the GPU (when one is present) is skipped for the plan."""
    import torch

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.cuda.is_available = available


_STAGE_PARAMETERS: dict = {}
"""Counts of :func:`stage_parameters` by shape, layout and kind."""


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_parameters(model, world: int, tp: int = 1, pp: int = 1, vpp: int | None = None,
                     kind: str = "gpt") -> list[int]:
    """Parameters per pipeline stage of one tensor-parallel rank, counted on models built by
    :func:`megatron_bliss.models.gpt.build_gpt_chunks` (``kind="score"``: :class:`ScoreModel`) on the meta device.

    Args:
        model: the shape.
        world: ranks of the layout (its data-parallel size is what TP x PP leaves).
        tp / pp / vpp: the layout.
        kind: ``gpt`` (target or proxy) or ``score`` (the proxy body with the pooling head).

    Returns:
        One count per pipeline stage (all its virtual chunks together).
    """
    from megatron_bliss.models.gpt import build_gpt_chunks
    from megatron_bliss.models.score_model import ScoreModel

    key = (tuple(model.shape_dict().items()), model.make_vocab_size_divisible_by, world, tp, pp, vpp, kind)
    if key in _STAGE_PARAMETERS:  # a schedule builds the same target for every round's phases
        return _STAGE_PARAMETERS[key]
    counts = []
    for stage in range(pp):
        with _rank_of_layout(world, tp, pp, vpp, stage * (world // pp)) as ps, _meta_models():
            assert ps.get_pipeline_model_parallel_rank() == stage
            if kind == "score":
                chunks = [ScoreModel(model, attention_backend="local")]
            else:
                chunks = build_gpt_chunks(model, attention_backend="local")
            counts.append(sum(_numel(c) for c in chunks))
    _STAGE_PARAMETERS[key] = counts
    return counts


# --------------------------------------------------------------------------------------------- byte rules
def gpu_attention(backend: str) -> str:
    """The attention a GPU run uses for ``model.attention_backend`` (``auto``: fused, Transformer Engine or SDPA)."""
    return "sdpa" if backend == "auto" else backend


def activation_bytes(model, micro_batch: int, layers: int, *, tp: int = 1, backend: str = "sdpa",
                     value_bytes: int = 2) -> float:
    """Activations a training forward keeps for ``layers`` layers of ``model`` at ``micro_batch`` sequences (see the
    module docstring; ``value_bytes`` 2 for bf16, 4 for fp32)."""
    s, b, h, a = model.seq_length, micro_batch, model.hidden_size, model.num_attention_heads
    fixed, split = ACTIVATION_BYTES_PER_SBH
    per_layer = s * b * h * (fixed + split / tp)
    if backend == "local":
        per_layer += ATTENTION_SCORE_BYTES * a * s * s * b / tp
    return per_layer * layers * value_bytes / 2


def _precision(train) -> str:
    return "fp32" if train.precision == "fp32" else "bf16"


def _rank_range(first: int, count: int, step: int = 1) -> str:
    last = first + (count - 1) * step
    return str(first) if count == 1 else f"{first}-{last}" if step == 1 else f"{first},{first + step},..,{last}"


# --------------------------------------------------------------------------------------------- stage plans
def plan_pretrain(cfg, world: int, *, steps: int | None = None, key: str = "pretrain", kind: str = "pretrain",
                  what: str = "target pretraining", branch: bool = False) -> PhasePlan:
    """Plan of one pretraining run (:class:`megatron_bliss.pretrain.config.PretrainRunConfig`) on ``world`` GPUs.

    Args:
        steps: optimizer steps of the phase (default: ``branch.steps`` for an evaluation branch, else
            ``train.train_steps``).
        key / kind / what: how the plan names the phase.
        branch: the run is an evaluation branch.
    """
    from megatron_bliss.pipeline.rounds import _lm_flops

    cfg.validate(world)
    p, t, o, m = cfg.parallel, cfg.train, cfg.optim, cfg.model
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    dp = p.data_parallel_size(world)
    steps = steps if steps is not None else (cfg.branch.steps if branch else t.train_steps)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    precision = _precision(t)
    weight_bytes, state_bytes = (2, 12) if precision == "bf16" else (4, 8)
    backend = gpu_attention(m.attention_backend)
    memory = []
    for stage, params in enumerate(stage_parameters(m, world, tp, pp, vpp)):
        in_flight = min(pp - stage, micro_batches) * (1 + (pp - 1) / (pp * vpp) if vpp else 1)
        layers = m.num_layers // pp
        if t.recompute_activations:
            acts = (2 * m.seq_length * t.micro_batch_size * m.hidden_size * layers * in_flight
                    + activation_bytes(m, t.micro_batch_size, 1, tp=tp, backend=backend))
        else:
            acts = activation_bytes(m, t.micro_batch_size, layers, tp=tp, backend=backend) * in_flight
        logits = 0.0
        if stage == pp - 1:
            logits = LOGIT_BYTES[precision] * t.micro_batch_size * m.seq_length * m.padded_vocab_size(tp) / tp
        ranks = _rank_range(stage * tp * dp, tp * dp)
        memory.append(RankMemory(ranks=ranks if pp == 1 else f"pp stage {stage}: {ranks}", parameters=params,
                                 weights=weight_bytes * params, gradients=4 * params,
                                 optimizer=state_bytes * params / (dp if o.use_distributed_optimizer else 1),
                                 activations=acts, other=logits))
    layout = (f"tp {tp} pp {pp}{f' vpp {vpp}' if vpp else ''} dp {dp}, micro-batch {t.micro_batch_size} x "
              f"{micro_batches} per step, {precision}{', distributed optimizer' if o.use_distributed_optimizer else ''}"
              f"{', recompute' if t.recompute_activations else ''}, {backend} attention")
    tokens = steps * t.global_batch_size * m.seq_length
    return PhasePlan(key=key, kind=kind, what=f"{what} ({m.preset}; {layout})", steps=steps, tokens=tokens,
                     flops=_lm_flops(m, steps, t), memory=memory)


def plan_bilevel(cfg, world: int, *, key: str = "bilevel") -> PhasePlan:
    """Plan of one bilevel round (:class:`megatron_bliss.bilevel.config.BilevelRunConfig`) on ``world`` GPUs."""
    import torch

    from megatron_bliss.bilevel.hvp import resolve_engine
    from megatron_bliss.pipeline.rounds import BlissPipeline

    cfg.validate()
    b, proxy, target = cfg.bilevel, cfg.proxy, cfg.target if cfg.bilevel.kl_coef > 0 else None
    tp = cfg.parallel.tensor_model_parallel_size
    dp = cfg.parallel.data_parallel_size(world)
    backend = gpu_attention(proxy.attention_backend)
    engine = resolve_engine(b.hvp_engine, b.mixed_term, b.curvature, attention_backend=backend, tp_size=tp,
                            params_dtype=torch.float32)
    (proxy_params,) = stage_parameters(proxy, world, tp)
    (score_params,) = stage_parameters(proxy, world, tp, kind="score")
    target_params = stage_parameters(target, world, tp)[0] if target is not None else 0
    micro = max(b.micro_batch_size, b.val_micro_batch_size)
    graph = EXACT_HVP_GRAPH if engine.engine == "exact" else 1
    acts = graph * activation_bytes(proxy, micro, proxy.num_layers, tp=tp, backend=backend, value_bytes=4)
    acts += activation_bytes(proxy, b.micro_batch_size, proxy.num_layers, tp=tp, backend=backend, value_bytes=4)
    logits = BILEVEL_LOGIT_BYTES * micro * proxy.seq_length * proxy.padded_vocab_size(tp) / tp
    solver = 4 * (SOLVER_VECTORS[b.solver] + 1) * proxy_params
    memory = [RankMemory(ranks=_rank_range(0, world), parameters=proxy_params + score_params + target_params,
                         weights=4 * (proxy_params + score_params), gradients=4 * (proxy_params + score_params),
                         optimizer=8 * (proxy_params + score_params), activations=acts,
                         other=logits + solver + 4 * target_params)]
    # the pipeline's estimate counts tokens over its world; a global micro-batch on one rank is the same count
    holder = types.SimpleNamespace(cfg=cfg)
    flops = BlissPipeline._bilevel_flops(holder, dataclasses.replace(b, micro_batch_size=b.micro_batch_size * world))
    kl = f", KL logits from the frozen {target.preset} (fp32, whole on every GPU)" if target is not None else ""
    what = (f"bilevel round ({proxy.preset} proxy and score model{kl}; tp {tp} dp {dp}, micro-batch "
            f"{b.micro_batch_size} per GPU, fp32, {backend} attention, {engine.engine} {b.curvature} products, "
            f"{b.solver} solver K={b.solver_steps})")
    return PhasePlan(key=key, kind="selection", what=what, steps=b.outer_steps,
                     tokens=b.outer_steps * b.micro_batch_size * world * proxy.seq_length, flops=flops,
                     memory=memory)


def plan_score(cfg, world: int, sequences: int, *, key: str = "score", method: str = "bliss",
               source: str = "") -> PhasePlan:
    """Plan of scoring ``sequences`` sequences (:class:`megatron_bliss.score.config.ScoreRunConfig`).

    Args:
        method: the pipeline's scoring method; gradsim runs the LM head
            (:func:`megatron_bliss.pipeline.rounds.score_flops` counts the passes).
        source: where the count came from, for the printed line.
    """
    from megatron_bliss.pipeline.rounds import score_flops

    output_layer = method == "gradsim"
    cfg.validate()
    m, s = cfg.model, cfg.scoring
    tp = cfg.parallel.tensor_model_parallel_size
    dp = cfg.parallel.data_parallel_size(world)
    backend = gpu_attention(m.attention_backend)
    (params,) = stage_parameters(m, world, tp, kind="gpt" if output_layer else "score")
    value_bytes = 2 if s.bf16 else 4
    acts = activation_bytes(m, s.micro_batch_size, 1, tp=tp, backend=backend, value_bytes=value_bytes)
    if output_layer:
        acts += 3 * activation_bytes(m, s.micro_batch_size, m.num_layers, tp=tp, backend=backend, value_bytes=4)
    memory = [RankMemory(ranks=_rank_range(0, world), parameters=params, weights=4 * params, activations=acts)]
    flops = score_flops(m, method, sequences)
    what = (f"scoring ({m.preset}; tp {tp} dp {dp}, micro-batch {s.micro_batch_size}, "
            f"{'bf16 autocast' if s.bf16 else 'fp32'}, {sequences:,} sequences{source})")
    return PhasePlan(key=key, kind="selection", what=what, steps=math.ceil(sequences / (s.micro_batch_size * dp)),
                     tokens=sequences * m.seq_length, flops=flops, memory=memory)


def plan_lm_eval(target, harness, world: int, *, key: str = "lm_eval") -> PhasePlan:
    """Plan of a harness evaluation of the target (:class:`megatron_bliss.eval.run.HarnessConfig`): the whole target
    on every GPU in fp32 under bf16 autocast, forwards of ``batch_size`` sequences without a graph. Its steps,
    tokens and FLOPs depend on the tasks' datasets and are not counted (as in the pipeline's record)."""
    (params,) = stage_parameters(target, world)
    backend = gpu_attention(target.attention_backend)
    value_bytes = 4 if harness.precision == "fp32" else 2
    b, s = harness.batch_size, target.seq_length
    acts = activation_bytes(target, b, 1, backend=backend, value_bytes=value_bytes)
    logits = (value_bytes + 4) * b * s * target.padded_vocab_size()  # the logits and their fp32 log-softmax
    what = (f"lm-evaluation-harness on {', '.join(harness.tasks)} ({target.preset} whole on each of {world} GPUs, "
            f"batch {b}; its tokens and FLOPs depend on the tasks and are not counted)")
    return PhasePlan(key=key, kind="eval", what=what, steps=0, tokens=0, flops=0.0,
                     memory=[RankMemory(ranks=_rank_range(0, world), parameters=params, weights=4 * params,
                                        activations=acts, other=logits)])


def _sequences(prefix: str) -> int | None:
    """Sequences in an indexed dataset, from its index alone; None when it does not exist."""
    from megatron_bliss.data.indexed import IndexedReader, exists

    return len(IndexedReader.open(prefix)) if prefix and exists(prefix) else None


def plan_pipeline(cfg, paths, world: int) -> list[PhasePlan]:
    """Plan of a whole run (:class:`megatron_bliss.pipeline.config.PipelineRunConfig`) on ``world`` GPUs, phase by
    phase in the pipeline's order, each phase's config built by the pipeline's own builders.

    A round's shard that does not exist yet is counted as the sequences the round's training draws from its
    selection: ``steps.target_round_steps x train.global_batch_size / selection.fraction``.
    """
    from megatron_bliss.pipeline.config import PROXY_METHODS
    from megatron_bliss.pipeline.rounds import BlissPipeline, _data_parallel
    from megatron_bliss.score.config import ScoreRunConfig

    cfg.validate()
    pipeline = BlissPipeline.__new__(BlissPipeline)  # its config builders, without __init__'s process group
    pipeline.cfg, pipeline.paths = cfg, paths
    c, method = cfg, cfg.run.method
    cache: dict = {}

    def pretrain(key, phase, r, steps, kind, what):
        run, _ = pipeline._pretrain_config(**pipeline._training_phase(phase, r))
        plan = plan_pretrain(run, world, steps=steps, key=key, kind=kind, what=what, branch=phase == "eval")
        return _dedupe(plan, ("pretrain", phase == "proxy"), cache)

    def lm_eval(r):
        if not c.eval.tasks:
            return []
        return [_dedupe(plan_lm_eval(c.target, c.eval, world, key=f"round{r}/lm_eval"), ("lm_eval",), cache)]

    target_run = "target continued on the round's selection"
    phases = [pretrain("round0/target", "target", 0, c.steps.target_warmup_steps, "pretrain", "target warm-up"),
              pretrain("round0/eval", "eval", 0, c.steps.eval_branch_steps, "eval", "evaluation branch"),
              *lm_eval(0)]
    if method in PROXY_METHODS:
        phases.append(pretrain("round0/proxy", "proxy", 0, c.steps.proxy_warmup_steps, "selection",
                               "proxy warm-up"))
    for r in range(1, c.run.rounds + 1):
        if method == "bliss":
            phases.append(_dedupe(plan_bilevel(pipeline._bilevel_config(r)[0], world, key=f"round{r}/bilevel"),
                                  ("bilevel",), cache))
        if method in PROXY_METHODS:
            count = _sequences(paths.shards[r] if r < len(paths.shards) else "")
            source = " in the shard"
            if count is None:
                count = round(c.steps.target_round_steps * c.train.global_batch_size / c.selection.fraction)
                source = ": steps.target_round_steps x train.global_batch_size / selection.fraction"
            scfg = ScoreRunConfig(model=c.proxy, parallel=_data_parallel(c), scoring=c.scoring)
            phases.append(_dedupe(plan_score(scfg, world, count, key=f"round{r}/score", method=method,
                                             source=source), ("score",), cache))
        elif method in ("dsir", "scores"):
            phases.append(PhasePlan(key=f"round{r}/score", kind="selection", what=f"{method} scores on rank 0's CPU",
                                    steps=0, tokens=0, flops=0.0))
        phases.append(PhasePlan(key=f"round{r}/select", kind="selection",
                                what="top-k of the scores and the subset written on rank 0's CPU", steps=0, tokens=0,
                                flops=0.0))
        phases += [pretrain(f"round{r}/target", "target", r, c.steps.target_round_steps, "pretrain", target_run),
                   pretrain(f"round{r}/eval", "eval", r, c.steps.eval_branch_steps, "eval", "evaluation branch"),
                   *lm_eval(r)]
    return phases


def _dedupe(plan: PhasePlan, group: tuple, cache: dict) -> PhasePlan:
    """Marks a phase whose per-rank memory repeats an earlier phase of the same group as ``same_as`` it."""
    signature = group + tuple((m.ranks, m.parameters, round(m.peak)) for m in plan.memory)
    if signature in cache:
        plan.same_as = cache[signature]
    else:
        cache[signature] = plan.key
    return plan


def plan_stage(cfg, paths, world: int) -> list[PhasePlan]:
    """The plan of whichever stage ``cfg`` configures: the pipeline, pretraining, a bilevel round or scoring.

    Raises:
        ValueError naming the stage when it has no dry run.
    """
    from megatron_bliss.bilevel.config import BilevelRunConfig
    from megatron_bliss.pipeline.config import PipelineRunConfig
    from megatron_bliss.pretrain.config import PretrainRunConfig
    from megatron_bliss.score.config import ScoreRunConfig

    if isinstance(cfg, PipelineRunConfig):
        return plan_pipeline(cfg, paths, world)
    if isinstance(cfg, PretrainRunConfig):
        branch = paths.branch_from is not None
        return [plan_pretrain(cfg, world, kind="eval" if branch else "pretrain", branch=branch,
                              what="evaluation branch" if branch else "pretraining")]
    if isinstance(cfg, BilevelRunConfig):
        return [plan_bilevel(cfg, world)]
    if isinstance(cfg, ScoreRunConfig):
        count, source = _sequences(paths.data_prefix), " in paths.data_prefix"
        cap = cfg.scoring.max_sequences
        if cap is not None and (count is None or cap < count):
            count, source = cap, ": scoring.max_sequences"
        if count is None:
            raise ValueError(f"paths.data_prefix ({paths.data_prefix or 'unset'}) does not exist: the dry run needs "
                             "it, or scoring.max_sequences, to count the sequences to score")
        return [plan_score(cfg, world, count, source=source)]
    raise ValueError(f"{type(cfg).__name__}: this stage has no dry run")


# --------------------------------------------------------------------------------------------- printing
def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def format_plan(phases: list[PhasePlan], world: int, limit_gb: float | None, title: str) -> str:
    """The printed plan: memory per rank for each distinct phase, the schedule, the totals and the rules."""
    limit = f"limit {limit_gb:g} GiB per GPU" if limit_gb else "no memory limit given (--run.gpu_memory_gb)"
    lines = [f"dry run: {title} on {world} GPUs, {limit}", "",
             "Memory per GPU (GiB, estimated; the CUDA context and allocator fragmentation come on top):", "",
             "| phase | ranks | parameters | weights | gradients | optimizer | activations | other | peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in phases:
        if phase.same_as or not phase.memory:
            continue
        for m in phase.memory:
            lines.append(f"| {phase.key} | {m.ranks} | {m.parameters:,} | {_gib(m.weights)} | {_gib(m.gradients)} | "
                         f"{_gib(m.optimizer)} | {_gib(m.activations)} | {_gib(m.other)} | {_gib(m.peak)} |")
    lines += ["", "Phases:", ""]
    for phase in phases:
        lines.append(f"- {phase.key}: {phase.what}" + (f" (memory as {phase.same_as})" if phase.same_as else ""))
    lines += ["", "| phase | kind | steps | tokens | FLOPs | peak GiB |", "|---|---|---:|---:|---:|---:|"]
    for phase in phases:
        peak = _gib(phase.peak) if phase.memory else "-"
        lines.append(f"| {phase.key} | {phase.kind} | {phase.steps:,} | {phase.tokens:,} | {phase.flops:.3e} | "
                     f"{peak} |")
    totals = plan_totals(phases)
    lines += ["", f"total: {totals['tokens']:,} tokens, {totals['flops']:.3e} FLOPs; target pretraining "
              f"{totals['pretrain_tokens']:,} tokens, {totals['pretrain_flops']:.3e} FLOPs; evaluation branches "
              f"{totals['eval_flops']:.3e} FLOPs; selection {totals['selection_flops']:.3e} FLOPs "
              f"({100 * totals['selection_share']:.1f} % of all FLOPs)", "",
              "Rules: bf16 training holds 2 B (bf16 weights) + 4 B (fp32 gradient buffer) + 12 B (fp32 main params, "
              "Adam m and v; divided by the data-parallel size with the distributed optimizer) per parameter; fp32 "
              "training 4 + 4 + 8. Activations per layer: s*b*h*(10 + 24/tp) bytes in bf16 (34*s*b*h at tp 1), "
              "+ 5*heads*s^2*b/tp for unfused attention, x2 in fp32, x micro-batches in flight on a pipeline stage "
              "(Korthikanti et al. 2022). Logits: 10 B (bf16) or 12 B (fp32) per position and vocabulary row. "
              "Bilevel (fp32): 16 B per proxy and score-model parameter, 4 B per frozen target parameter, 4 B per "
              "proxy parameter and solver vector, 20 B per logit (proxy and target), x3 activations for exact "
              "double-backward products. Scoring: fp32 weights and one layer's activations (no graph)."]
    return "\n".join(lines) + "\n"


def plan_totals(phases: list[PhasePlan]) -> dict:
    """Tokens and FLOPs over the plan, by kind, and the selection share of the FLOPs."""
    by_kind = {kind: [p for p in phases if p.kind == kind] for kind in ("pretrain", "selection", "eval")}
    flops = sum(p.flops for p in phases)
    selection = sum(p.flops for p in by_kind["selection"])
    return {"tokens": sum(p.tokens for p in phases), "flops": flops,
            "pretrain_tokens": sum(p.tokens for p in by_kind["pretrain"]),
            "pretrain_flops": sum(p.flops for p in by_kind["pretrain"]),
            "eval_flops": sum(p.flops for p in by_kind["eval"]), "selection_flops": selection,
            "selection_share": selection / flops if flops else 0.0}


def check_limit(phases: list[PhasePlan], limit_gb: float | None) -> str | None:
    """The refusal of the first phase whose largest rank's estimate exceeds ``limit_gb`` GiB, or None."""
    if not limit_gb:
        return None
    for phase in phases:
        worst = phase.worst()
        if worst is not None and worst.peak > limit_gb * GIB:
            return (f"{phase.key}: rank(s) {worst.ranks} need an estimated {worst.peak / GIB:.1f} GiB, more than "
                    f"--run.gpu_memory_gb={limit_gb:g}")
    return None


def dry_run(cfg, paths, options: DryRunOptions, title: str) -> int:
    """Prints the plan of a stage (on global rank 0) and returns 0, or exits 1 naming the phase, the rank's estimate
    and the limit when a phase does not fit ``options``' memory limit."""
    world = options.resolved_world_size()
    limit = options.resolved_limit_gb()
    phases = plan_stage(cfg, paths, world)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(format_plan(phases, world, limit, title))
        sys.stdout.flush()
    refusal = check_limit(phases, limit)
    if refusal:
        raise SystemExit(f"dry run refused: {refusal}")
    return 0
