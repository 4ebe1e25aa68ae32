"""Target (and warm-up proxy) pretraining on megatron-core schedules, DDP and optimizers."""
