"""Checkpoints: round trip, atomic writes, bad files, and resuming bit for bit."""

import os
import zipfile

import numpy as np
import pytest

import fastlstm
from fastlstm import io
from fastlstm.heads import SoftmaxHead
from fastlstm.optim import SGD, Adagrad, Adam
from fastlstm.tasks import EchoTask
from fastlstm.train import Callback, Trainer


def make_trainer(backend, *, hidden=4, optimizer=None, dtype="float32", seed=0, window=15, callbacks=()):
    model = fastlstm.LSTM(1, hidden, 3, dtype=dtype, backend=backend, seed=seed)
    head = SoftmaxHead(hidden, 2, dtype=dtype, backend=backend, seed=seed, kernel_init="uniform")
    optimizer = Adagrad(0.3) if optimizer is None else optimizer
    return Trainer(model, head, optimizer, window=window, progress=False, callbacks=callbacks)


class StopAt(Callback):
    def __init__(self, window):
        self.window = window

    def on_window_end(self, trainer, loss):
        if trainer.windows == self.window:
            raise KeyboardInterrupt


def trained_mid_series(backend, tmp_path, **kwargs):
    # A trainer stopped at window 7 of its second series, and the task that feeds it.
    task = EchoTask(length=1500, seed=3)
    trainer = make_trainer(backend, callbacks=[StopAt(27)], **kwargs)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(task.series, epochs=3)
    return task, trainer


def test_round_trip(backend, tmp_path):
    task, trainer = trained_mid_series(backend, tmp_path, optimizer=Adam(0.01))
    path = tmp_path / "run.npz"
    rng_state = task.rng_state(repeat_last_series=True)
    assert io.save(path, trainer, rng_state=rng_state, config={"note": "test"}) == str(path)

    fresh = make_trainer(backend, optimizer=Adam(0.01), seed=99)
    checkpoint = io.load(path, fresh)
    np.testing.assert_array_equal(fresh.model.params, trainer.model.params)
    np.testing.assert_array_equal(fresh.head.params, trainer.head.params)
    for ours, theirs in zip(fresh.optimizer.slots, trainer.optimizer.slots):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(fresh.state, trainer.state)
    np.testing.assert_array_equal(fresh.losses, trainer.losses)
    assert fresh.epoch_losses == trainer.epoch_losses
    assert fresh.optimizer.iterations == trainer.optimizer.iterations == 27
    assert (fresh.epoch, fresh.window_in_epoch, fresh.windows) == (1, 7, 27)
    assert checkpoint.rng_state == rng_state
    assert checkpoint.config == {"note": "test"}
    assert checkpoint.metadata["fastlstm_version"] == fastlstm.__version__
    assert checkpoint.metadata["model"]["hidden_size"] == 4
    assert checkpoint.metadata["model"]["dtype"] == "float32"
    assert checkpoint.metadata["optimizer"]["name"] == "Adam"


def test_file_loads_without_pickle(backend, tmp_path):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    with np.load(path, allow_pickle=False) as archive:
        assert {"model_params", "head_params", "model_slots", "head_slots", "state", "metadata"} <= set(archive.files)
        assert archive["model_params"].dtype == np.float32


@pytest.mark.parametrize("stop_window", [27, 40], ids=["mid-series", "series-boundary"])
def test_resume_is_bitwise_identical(backend, tmp_path, stop_window):
    straight_task = EchoTask(length=1500, seed=3)
    straight = make_trainer(backend)
    straight.fit(straight_task.series, epochs=3)

    task = EchoTask(length=1500, seed=3)
    trainer = make_trainer(backend, callbacks=[StopAt(stop_window)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(task.series, epochs=3)
    path = tmp_path / "run.npz"
    io.save(path, trainer, rng_state=task.rng_state(repeat_last_series=trainer.window_in_epoch > 0))
    del trainer, task

    resumed_task = EchoTask(length=1500, seed=3)
    resumed = make_trainer(backend, seed=12345)
    checkpoint = io.load(path, resumed)
    resumed_task.set_rng_state(checkpoint.rng_state)
    resumed.fit(resumed_task.series, epochs=3 - resumed.epoch)

    assert resumed.windows == straight.windows == 60
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)
    np.testing.assert_array_equal(resumed.head.params, straight.head.params)
    np.testing.assert_array_equal(resumed.optimizer.slots[0], straight.optimizer.slots[0])
    np.testing.assert_array_equal(resumed.state, straight.state)
    np.testing.assert_array_equal(resumed.losses, straight.losses)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        io.load(path)


def test_truncated_file(backend, tmp_path):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    data = path.read_bytes()
    for length in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match="run.npz is not a readable fastlstm checkpoint"):
            io.load(path)


def test_corrupt_array_data(backend, tmp_path):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    data = bytearray(path.read_bytes())
    where = bytes(data).find(trainer.model.params.tobytes())
    assert where > 0
    data[where + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="run.npz.*CRC"):
        io.load(path)


def test_other_files_are_rejected(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.npz is not a readable fastlstm checkpoint"):
        io.load(text)

    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz is not a fastlstm checkpoint: it has no metadata"):
        io.load(other)

    wrong_format = tmp_path / "format.npz"
    np.savez(wrong_format, metadata=np.array('{"format": "something else"}'))
    with pytest.raises(ValueError, match="format.npz is not a fastlstm checkpoint"):
        io.load(wrong_format)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, metadata=np.array([{"format": "fastlstm-checkpoint"}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz is not a readable fastlstm checkpoint"):
        io.load(pickled)


def test_missing_entries(backend, tmp_path):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files if name != "head_slots"}
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="run.npz is missing checkpoint entries: head_slots"):
        io.load(path)


@pytest.mark.parametrize("other, field", [
    (lambda backend: make_trainer(backend, hidden=5), "model.hidden_size"),
    (lambda backend: make_trainer(backend, dtype="float64"), "model.dtype"),
    (lambda backend: make_trainer(backend, optimizer=SGD(0.3)), "the optimizer"),
    (lambda backend: make_trainer(backend, window=10), "window"),
])
def test_mismatched_trainer(backend, tmp_path, other, field):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    target = other(backend)
    before = target.model.params.copy()
    with pytest.raises(ValueError, match=f"run.npz does not match the trainer: {field}"):
        io.load(path, target)
    np.testing.assert_array_equal(target.model.params, before)


def test_atomic_write_replaces_and_leaves_no_temporary(backend, tmp_path):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    path.write_bytes(b"old contents")
    io.save(path, trainer)
    assert zipfile.is_zipfile(path)
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]


def test_failed_write_keeps_old_file(backend, tmp_path, monkeypatch):
    _, trainer = trained_mid_series(backend, tmp_path)
    path = tmp_path / "run.npz"
    io.save(path, trainer)
    old = path.read_bytes()

    def broken_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    trainer.model.params[...] += 1.0
    with pytest.raises(OSError, match="No space left"):
        io.save(path, trainer)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]


def test_unserialisable_config(backend, tmp_path):
    trainer = make_trainer(backend)
    with pytest.raises(ValueError, match="JSON"):
        io.save(tmp_path / "run.npz", trainer, config={"array": np.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_fresh_trainer_round_trip(backend, tmp_path):
    trainer = make_trainer(backend, optimizer=Adagrad(0.1))
    path = tmp_path / "fresh.npz"
    io.save(path, trainer)
    restored = make_trainer(backend, optimizer=Adagrad(0.1), seed=5)
    io.load(path, restored)
    assert restored.state is None
    assert restored.windows == 0
    np.testing.assert_array_equal(restored.model.params, trainer.model.params)
    np.testing.assert_array_equal(restored.optimizer.slots[0], np.float32(0.1))
