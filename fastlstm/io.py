"""Checkpoints: one ``.npz`` file with everything needed to resume training bit for bit.

A checkpoint contains the model and head parameters, the optimizer's slots and update count, the packed
state buffer, the trainer's counters and loss history, an optional random generator state (for the
data source) and metadata: the fastlstm version, the model's sizes, dtype and backend, the optimizer's
hyperparameters and a caller-supplied ``config`` dict. Arrays are stored as npz members; the metadata is
one JSON string member, so ``numpy.load(allow_pickle=False)`` reads the whole file.

Files are written atomically: to a temporary file in the same directory, flushed and fsynced, then
renamed over the target with ``os.replace``. A crash leaves either the old file or the new one.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "fastlstm-checkpoint"
FORMAT_VERSION = 1

_ARRAYS = ("model_params", "head_params", "model_slots", "head_slots", "losses", "epoch_losses")
_COUNTERS = ("optimizer_iterations", "epoch", "window_in_epoch", "windows")


class Checkpoint:
    """The contents of a checkpoint file.

    ``arrays`` maps names to numpy arrays: ``model_params``, ``head_params``, ``model_slots``,
    ``head_slots``, ``losses``, ``epoch_losses`` and, when the trainer had one, ``state``.
    ``metadata`` is the decoded JSON dict with the keys ``counters``, ``model``, ``head``,
    ``optimizer``, ``config`` and ``rng_state``, among others.
    """

    def __init__(self, path, arrays, metadata):
        self.path = path
        self.arrays = arrays
        self.metadata = metadata

    @property
    def config(self):
        return self.metadata.get("config")

    @property
    def rng_state(self):
        return self.metadata.get("rng_state")

    def __repr__(self):
        counters = self.metadata.get("counters", {})
        return (f"Checkpoint({str(self.path)!r}, epoch={counters.get('epoch')}, "
                f"window_in_epoch={counters.get('window_in_epoch')}, windows={counters.get('windows')})")


def _describe(trainer):
    # Sizes that a checkpoint must agree with before it can be loaded into ``trainer``.
    model, head, optimizer = trainer.model, trainer.head, trainer.optimizer
    return {
        "model": {"input_size": model.input_size, "hidden_size": model.hidden_size,
                  "num_layers": model.num_layers, "forget_bias": model.forget_bias,
                  "dtype": model.dtype.name, "backend": model.backend},
        "head": {"type": type(head).__name__, "hidden_size": head.hidden_size,
                 "num_classes": head.num_classes},
        "optimizer": optimizer.config(),
        "window": trainer.window,
    }


def save(path, trainer, *, rng_state=None, config=None):
    """Write ``trainer``'s training state to ``path`` atomically; return the path.

    ``rng_state`` is a ``numpy.random`` bit generator state dict (as from ``EchoTask.rng_state``).
    ``config`` is any JSON-serialisable dict, for example the command-line settings. Both are stored in
    the metadata and returned by ``load``.
    """
    from fastlstm import __version__

    path = os.fspath(path)
    values = trainer.state_dict()
    arrays = {name: np.asarray(values[name]) for name in _ARRAYS}
    if values["state"] is not None:
        arrays["state"] = values["state"]
    metadata = _describe(trainer)
    metadata.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        fastlstm_version=__version__,
        counters={name: int(values[name]) for name in _COUNTERS},
        rng_state=rng_state,
        config=config,
    )
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"rng_state and config must be JSON-serialisable, but encoding failed: {error}") from None
    arrays["metadata"] = np.array(encoded)

    directory = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        try:
            os.unlink(handle.name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def _fsync_directory(directory):
    # Make the rename durable too. Not every platform can open a directory (Windows cannot).
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load(path, trainer=None):
    """Read the checkpoint at ``path``; with ``trainer``, also restore it into that trainer.

    Raises FileNotFoundError for a missing file, and ValueError naming the file for a file that is not
    a readable fastlstm checkpoint (truncated, corrupt, another format) or that does not match
    ``trainer``'s model, head, optimizer or window. Returns a ``Checkpoint``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    checkpoint = _read(path)
    if trainer is not None:
        restore(checkpoint, trainer)
    return checkpoint


def _read(path):
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            if "metadata" not in names:
                raise ValueError(f"{path} is not a fastlstm checkpoint: it has no metadata entry")
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if str(error).startswith(path):
            raise
        raise ValueError(f"{path} is not a readable fastlstm checkpoint: {error}") from error
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, NotImplementedError,
            RuntimeError) as error:
        # zipfile raises NotImplementedError and RuntimeError for edited version, compression or
        # encryption fields.
        raise ValueError(f"{path} is not a readable fastlstm checkpoint (truncated or corrupt?): "
                         f"{type(error).__name__}: {error}") from error

    try:
        metadata = json.loads(str(arrays.pop("metadata")))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has corrupt metadata: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastlstm checkpoint: its metadata has no format {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {metadata.get('format_version')!r}, "
                         f"but this fastlstm reads version {FORMAT_VERSION}")
    missing = [name for name in _ARRAYS if name not in arrays]
    counters = metadata.get("counters")
    if not isinstance(counters, dict):
        missing.append("counters")
    else:
        missing += [f"counters.{name}" for name in _COUNTERS if name not in counters]
    if missing:
        raise ValueError(f"{path} is missing checkpoint entries: {', '.join(missing)}")
    return Checkpoint(path, arrays, metadata)


def restore(checkpoint, trainer):
    """Copy a loaded ``Checkpoint`` into ``trainer``, after checking that its sizes match.

    The backend may differ (the parameters carry over, but results then agree only up to rounding).
    Raises ValueError naming the checkpoint's file and the first mismatch.
    """
    expected = _describe(trainer)
    found = {name: checkpoint.metadata.get(name) for name in expected}
    for section in ("model", "head"):
        for key, value in expected[section].items():
            if key == "backend":
                continue
            stored = (found[section] or {}).get(key)
            if stored != value:
                raise ValueError(f"{checkpoint.path} does not match the trainer: {section}.{key} is {stored!r} "
                                 f"in the file and {value!r} in the trainer")
    stored_optimizer = found["optimizer"] or {}
    if stored_optimizer.get("name") != expected["optimizer"]["name"]:
        raise ValueError(f"{checkpoint.path} does not match the trainer: the optimizer is "
                         f"{stored_optimizer.get('name')!r} in the file and {expected['optimizer']['name']!r} "
                         f"in the trainer")
    if found["window"] != expected["window"]:
        raise ValueError(f"{checkpoint.path} does not match the trainer: window is {found['window']!r} in the "
                         f"file and {expected['window']!r} in the trainer")

    values = dict(checkpoint.arrays)
    values.setdefault("state", None)
    values.update(checkpoint.metadata["counters"])
    try:
        trainer.load_state_dict(values)
    except ValueError as error:
        raise ValueError(f"{checkpoint.path} does not match the trainer: {error}") from error
