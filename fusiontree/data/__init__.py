"""Data: tokenizers (SentencePiece or tokenizer.json), packed length-bucketed webdataset shards,
weighted mixtures, curriculum loader.

Build shards with `python data_pipeline/build_shards.py` (fusiontree/data/build.py; input
formats in corpus.py, tokenizers in tokenizer.py); train from them with
`build_train_loader` (fusiontree/data/loader.py explains the API, the curriculum and exact
resume) and `load_tokenizer` (the tokenizer the shards' manifest records).
"""

import importlib

# Imported on first use, so that the shard builder does not pull in torch.
_EXPORTS = {
    "TrainLoader": "loader", "ValLoader": "loader", "build_train_loader": "loader",
    "build_val_loaders": "loader", "load_tokenizer": "loader",
    "positions_from_doc_starts": "packing",
    "CorruptShardError": "shards", "read_manifest": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fusiontree.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fusiontree.data.{_EXPORTS[name]}"), name)
