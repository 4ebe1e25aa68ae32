"""Training throughput of the target trainer: tokens/s, model TFLOP/s per device and MFU for a preset and layout.

Runs the real training step (megatron-core schedule, DDP, optimizer, WSD learning rate) on random tokens, so the
figure is what ``megatron_bliss.pretrain`` achieves minus data loading. One process by default; under torchrun for
data/tensor/pipeline parallelism:

    python bench/train_throughput.py --preset 1b --micro-batch 4 --seq-length 1024          # one GPU
    torchrun --nproc-per-node 8 bench/train_throughput.py --preset 2.8b --tp 2 --micro-batch 4
    python bench/train_throughput.py --preset debug --seq-length 64 --steps 4 --warmup 1     # CPU smoke run

Prints one row per timed step, a summary table, then a last line with the headline figure (MFU on a GPU,
tokens/s on the CPU, where no peak FLOP/s is meaningful). MFU counts model FLOPs only (6 x matmul parameters plus
attention; activation recomputation is not credited), against ``--peak-flops`` or the detected GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
warnings.filterwarnings("ignore", message="Apex is not installed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="410m", help="model preset (pythia_160m, 410m, 1b, 2.8b, tiny, debug, ...)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step and data-parallel rank")
    p.add_argument("--seq-length", type=int, default=1024, help="positions per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--attention", default="auto", choices=("auto", "sdpa", "te", "local"),
                   help="model.attention_backend: te/sdpa use fused (flash) kernels on GPU")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer state over DP ranks")
    p.add_argument("--overlap-grad-reduce", action="store_true", help="overlap DP gradient reduction")
    p.add_argument("--recompute", action="store_true", help="full activation recomputation")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer layer")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per device for MFU (default: by GPU)")
    return p.parse_args(argv)


def build_config(args, world_size: int):
    from megatron_bliss.config import load_config
    from megatron_bliss.pretrain.config import PretrainRunConfig

    dp = world_size // (args.tp * args.pp)
    overrides = {
        "model.preset": args.preset, "model.seq_length": args.seq_length, "model.attention_backend": args.attention,
        "parallel.tensor_model_parallel_size": args.tp, "parallel.pipeline_model_parallel_size": args.pp,
        "train.micro_batch_size": args.micro_batch, "train.global_batch_size": args.micro_batch * args.grad_accum * dp,
        "train.train_steps": args.warmup + args.steps, "train.precision": args.precision,
        "train.eval_interval": None, "train.recompute_activations": args.recompute,
        "optim.use_distributed_optimizer": args.distributed_optimizer,
        "optim.overlap_grad_reduce": args.overlap_grad_reduce, "schedule.warmup_steps": 10,
        "logging.tensorboard": False, "logging.progress_bar": False, "logging.peak_flops": args.peak_flops,
    }
    if args.vpp:
        overrides["parallel.virtual_pipeline_model_parallel_size"] = args.vpp
    return load_config(PretrainRunConfig, None,
                       [f"--{k}={'null' if v is None else v}" for k, v in overrides.items()])


def compile_layers(trainer) -> None:
    """torch.compile each transformer layer in place (the schedule, DDP hooks and optimizer stay eager)."""
    for chunk in trainer.chunks:
        for layer in chunk.decoder.layers:
            layer.compile()


def main(argv=None) -> int:
    import torch

    from megatron_bliss import parallel
    from megatron_bliss.log import setup_logging
    from megatron_bliss.pretrain.config import PretrainPaths
    from megatron_bliss.pretrain.data import SyntheticBatches
    from megatron_bliss.pretrain.trainer import PretrainTrainer

    args = parse_args(argv)
    setup_logging("WARNING")
    cfg = build_config(args, int(os.environ.get("WORLD_SIZE", "1")))
    parallel.initialize(cfg.parallel)
    dp_rank, dp_size = parallel.data_parallel_rank_and_size()
    data = SyntheticBatches(cfg.model.vocab_size, cfg.model.seq_length + 1, cfg.train.global_batch_size,
                            cfg.train.micro_batch_size, dp_rank, dp_size, parallel.get_device())
    trainer = PretrainTrainer(cfg, PretrainPaths(), train_data=data)  # synthetic data, nothing saved
    if args.compile:
        compile_layers(trainer)
    rows = []
    for step in range(args.warmup + args.steps):
        m = trainer.train_step()
        if step >= args.warmup:
            rows.append(m)
            if parallel.is_rank0():
                print(f"step {step + 1:4d}  loss {m['loss']:.4f}  {m['step_time_s'] * 1e3:9.1f} ms  "
                      f"{m['tokens_per_s']:12.0f} tok/s  {m['tflops_per_device']:8.2f} TFLOP/s/dev", flush=True)
    seconds = statistics.median(r["step_time_s"] for r in rows)
    from megatron_bliss.pretrain.throughput import throughput_metrics

    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    summary = throughput_metrics(tokens, seconds, trainer.flops_per_token, parallel.world_size(), trainer.peak_flops)
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if parallel.is_rank0():
        attention = trainer.chunks[0].attention_backend
        dtype = str(next(trainer.chunks[0].parameters()).dtype).removeprefix("torch.")
        head = ["preset", "world", "tp", "pp", "vpp", "micro", "global", "seq", "dtype", "attn", "step ms",
                "tokens/s", "TFLOP/s/dev", "MFU", "max GiB"]
        vals = [cfg.model.preset, parallel.world_size(), args.tp, args.pp, args.vpp or "-", args.micro_batch,
                cfg.train.global_batch_size, cfg.model.seq_length, dtype, attention, f"{seconds * 1e3:.1f}",
                f"{summary['tokens_per_s']:.0f}", f"{summary['tflops_per_device']:.2f}",
                "-" if summary["mfu"] is None else f"{summary['mfu'] * 100:.1f}%",
                "-" if memory is None else f"{memory:.1f}"]
        widths = [max(len(str(h)), len(str(v))) for h, v in zip(head, vals)]
        print(" | ".join(str(h).rjust(w) for h, w in zip(head, widths)))
        print(" | ".join(str(v).rjust(w) for v, w in zip(vals, widths)))
        if summary["mfu"] is not None:
            print(f"headline: {cfg.model.preset} MFU {summary['mfu'] * 100:.1f}% "
                  f"({summary['tokens_per_s']:.0f} tokens/s, {summary['tflops_per_device']:.1f} TFLOP/s per device)")
        else:
            print(f"headline: {cfg.model.preset} {summary['tokens_per_s']:.0f} tokens/s "
                  f"({summary['tflops_per_device']:.4f} TFLOP/s per device; MFU needs a GPU or --peak-flops)")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
