"""ullme: decoder LLMs as text-embedding models, from fine-tuning to retrieval."""

__version__ = "0.1.0"
