"""``python -m megatron_bliss.pretraining`` runs :func:`megatron_bliss.pretrain.main`."""

from megatron_bliss.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
