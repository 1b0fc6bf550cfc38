"""fastlstm: fused multi-layer LSTM forward and backward kernels for CPUs."""

from fastlstm import io, tasks
from fastlstm._backends import backends, get_num_threads, set_num_threads
from fastlstm.charlm import CharLM, CharLMTrainer
from fastlstm.heads import HeadGradients, SoftmaxHead
from fastlstm.model import LSTM, Gradients, Tape
from fastlstm.optim import (SGD, Adagrad, Adam, Optimizer, StepDecay, clip_by_global_norm,
                            global_norm)
from fastlstm.train import Callback, Trainer

__version__ = "0.1.0"

__all__ = [
    "LSTM", "Gradients", "Tape", "SoftmaxHead", "HeadGradients", "SGD", "Adagrad", "Adam",
    "Optimizer", "StepDecay", "clip_by_global_norm", "global_norm", "Trainer", "Callback",
    "CharLM", "CharLMTrainer", "backends", "get_num_threads", "set_num_threads", "io", "tasks",
    "__version__",
]
