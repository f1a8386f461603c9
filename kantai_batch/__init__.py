"""kantai-batch: pretrain transformer language models from scratch as batch jobs."""

__version__ = "0.1.0"
