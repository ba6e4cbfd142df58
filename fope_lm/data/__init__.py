"""Token data: prepare corpora into memmap shards (`prepare`, scripts/prepare_data.py) and read them for training
(`TrainBatches`) and eval (`ValidationTokens`). See docs/data.md."""

from fope_lm.data.config import DEFAULT_TOKENIZER, DataConfig
from fope_lm.data.dataset import TokenData, TrainBatches, ValidationTokens
from fope_lm.data.embedded import embedded_documents, train_embedded_tokenizer
from fope_lm.data.prepare import DEFAULT_SHARD_TOKENS, ensure_prepared, load_tokenizer, prepare

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_TOKENIZER",
    "DataConfig",
    "TokenData",
    "TrainBatches",
    "ValidationTokens",
    "embedded_documents",
    "ensure_prepared",
    "load_tokenizer",
    "prepare",
    "train_embedded_tokenizer",
]
