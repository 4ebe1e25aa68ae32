"""megatron-core reads our outputs: IndexedDataset over both modes, GPTDataset over documents mode."""

import numpy as np

from megatron_bliss.data import DataConfig, build_tokenizer, preprocess


def test_indexed_dataset_and_gpt_dataset(tmp_path, sample_files, tokenizer_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = str(tmp_path / "docs")
    seqs = str(tmp_path / "seqs")
    preprocess(DataConfig(input=sample_files, output_prefix=docs, tokenizer_model=tokenizer_path, mode="documents",
                          workers=0, progress=False))
    preprocess(DataConfig(input=sample_files, output_prefix=seqs, tokenizer_model=tokenizer_path,
                          tokens_per_sequence=64, workers=0, progress=False))
    tok = build_tokenizer(tokenizer_path)
    indexed = IndexedDataset(seqs)
    assert set(indexed.sequence_lengths.tolist()) == {64}
    indexed_docs = IndexedDataset(docs)
    assert all(indexed_docs[i][-1] == tok.eod for i in range(len(indexed_docs)))

    config = GPTDatasetConfig(random_seed=1234, sequence_length=64, blend=([docs], None), split="1,0,0",
                              tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
                              mid_level_dataset_surplus=0.005)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [40, None, None], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= 40
    sample = train[3]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)
    assert int(sample["tokens"].max()) < tok.vocab_size
    np.testing.assert_array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())
    assert float(sample["loss_mask"].sum()) == 64.0  # pad is -1 (none): nothing masked
