"""fope-lm: pretraining OLMo-style decoders to study position embeddings and length generalization."""

__version__ = "0.1.0"
