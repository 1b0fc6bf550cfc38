"""Data sources for training: the echo task."""

from fastlstm.tasks.echo import EchoTask, generate_series

__all__ = ["EchoTask", "generate_series"]
