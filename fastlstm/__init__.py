"""fastlstm: fused multi-layer LSTM forward and backward kernels for CPUs."""

from fastlstm._backends import backends
from fastlstm.model import LSTM, Gradients, Tape

__version__ = "0.1.0"

__all__ = ["LSTM", "Gradients", "Tape", "backends", "__version__"]
