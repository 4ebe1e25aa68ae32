"""Exports of our checkpoints to other formats, and imports back: Hugging Face GPT-NeoX (:mod:`.hf`)."""
