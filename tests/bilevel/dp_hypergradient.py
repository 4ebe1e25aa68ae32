"""Run under torchrun (2 gloo processes): each rank takes its half of the train and validation batches saved by the
test, computes the hypergradient, and rank 0 saves what the test compares with the 1-process result."""

import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*Apex.*|.*Transformer Engine.*")


def main(inputs_path: str, output_path: str) -> None:
    from megatron_bliss import parallel
    from megatron_bliss.bilevel import BilevelConfig, score_hypergradient
    from tests.bilevel import tiny

    parallel.initialize(parallel.ParallelConfig())
    rank, size = parallel.data_parallel_rank_and_size()
    saved = torch.load(inputs_path, weights_only=True)
    proxy, score, _ = tiny.tiny_models()
    proxy.load_state_dict(saved["proxy"])
    score.load_state_dict(saved["score"])
    outputs = {}
    for name, kwargs in saved["configs"].items():
        cfg = BilevelConfig(**kwargs)
        half = lambda t: t.chunk(size)[rank]  # noqa: E731
        val = {"tokens": half(saved["val_tokens"]), "loss_mask": half(saved["val_mask"])}
        result = score_hypergradient(score, proxy, half(saved["tokens"]), val, half(saved["target_logits"]), cfg)
        outputs[name] = {"grads": result.grads, "z": result.z, "c_bar": result.c_bar, "val_loss": result.val_loss,
                         "residual": result.residual}
    if rank == 0:
        torch.save(outputs, output_path)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
