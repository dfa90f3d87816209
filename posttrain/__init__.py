"""posttrain: one tool for the whole post-training life of a language model."""

__version__ = "0.1.0"
