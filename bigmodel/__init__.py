"""bigmodel: build GPT/BERT-style models as a tracked, versioned pipeline."""

__version__ = "0.1.0"
