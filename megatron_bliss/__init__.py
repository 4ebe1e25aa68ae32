"""megatron_bliss: BLISS (bilevel influence scoring) data selection and LLM pretraining on megatron-core."""

__version__ = "0.1.0"
