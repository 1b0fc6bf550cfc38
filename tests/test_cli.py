"""The ``fastlstm echo`` command line."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fastlstm import io
from fastlstm.cli import main
from fastlstm.train import Trainer

# 1500 bits in 5 rows of 300 give 20 windows of 15 per epoch.
SMALL = ["echo", "--length", "1500", "--seed", "0"]


def run_json(capsys, argv):
    assert main(argv + ["--json", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_echo_json_summary(backend, capsys):
    summary, lines = run_json(capsys, SMALL + ["--epochs", "2", "--backend", backend])
    assert summary["backend"] == backend
    assert summary["windows"] == 40
    assert summary["epochs"] == 2
    assert summary["seed"] == 0
    assert 0.0 < summary["loss"] < 1.0
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["windows_per_second"] > 0
    assert lines[0].startswith("last epoch mean loss: ")
    assert lines[1].startswith("held-out accuracy")


def test_echo_prints_loss_lines(backend, capsys):
    assert main(SMALL + ["--epochs", "1", "--log-every", "10", "--no-progress", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out
    assert "window     0  loss " in out
    assert "window    10  loss " in out
    assert "window     5  loss " not in out
    assert "last epoch mean loss" in out


def test_echo_is_reproducible(backend, capsys):
    first, _ = run_json(capsys, SMALL + ["--epochs", "1", "--backend", backend])
    second, _ = run_json(capsys, SMALL + ["--epochs", "1", "--backend", backend])
    other, _ = run_json(capsys, ["echo", "--length", "1500", "--seed", "1", "--epochs", "1", "--backend", backend])
    assert first["loss"] == second["loss"]
    assert first["loss"] != other["loss"]


def test_echo_plot_is_png(backend, tmp_path, capsys):
    path = tmp_path / "echo.png"
    run_json(capsys, SMALL + ["--epochs", "1", "--plot", str(path), "--backend", backend])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_echo_other_optimizers(backend, capsys, optimizer):
    summary, _ = run_json(capsys, SMALL + ["--epochs", "1", "--optimizer", optimizer, "--clip-norm", "1",
                                           "--backend", backend])
    assert summary["windows"] == 20


@pytest.mark.parametrize("argv, message", [
    (["echo", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["echo", "--epochs", "many"], "--epochs: expected a positive integer, got 'many'"),
    (["echo", "--learning-rate", "-1"], "--learning-rate: expected a finite number > 0"),
    (["echo", "--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
    (["echo", "--length", "1001"], "--length 1001 must be a multiple of --batch-size 5"),
    (["echo", "--length", "50", "--window", "15"], "--window 15 must be at most the row length"),
    (["echo", "--backend", "gpu"], "--backend: invalid choice"),
    (["echo", "--bogus"], "unrecognized arguments: --bogus"),
    (["charm"], "invalid choice: 'charm'"),
    ([], "required: COMMAND"),
])
def test_bad_options_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_missing_file(tmp_path, capsys):
    path = tmp_path / "absent.npz"
    assert main(SMALL + ["--resume", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err
    assert str(path) in err


def test_resume_other_file(tmp_path, capsys):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(2))
    assert main(SMALL + ["--resume", str(path)]) == 1
    assert "not a fastlstm checkpoint" in capsys.readouterr().err


def interrupt_at(monkeypatch, window):
    """Send SIGINT to this process right after the ``window``-th trained window."""
    original = Trainer._train_window
    count = [0]

    def train_window(self, x, labels):
        loss = original(self, x, labels)
        count[0] += 1
        if count[0] == window:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "_train_window", train_window)


def test_interrupt_saves_and_resume_is_bitwise(backend, tmp_path, capsys, monkeypatch):
    straight_path = tmp_path / "straight.npz"
    straight, _ = run_json(capsys, SMALL + ["--epochs", "3", "--backend", backend, "--save", str(straight_path)])

    path = tmp_path / "interrupted.npz"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 27)
        assert main(SMALL + ["--epochs", "3", "--backend", backend, "--save", str(path), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at epoch 2 window 7" in err
    assert f"--resume {path}" in err
    assert io.load(path).metadata["counters"]["windows"] == 27

    resumed, _ = run_json(capsys, ["echo", "--resume", str(path), "--save", str(path), "--backend", backend])
    assert resumed["windows"] == 60
    assert resumed["loss"] == straight["loss"]
    assert resumed["accuracy"] == straight["accuracy"]
    finished, reference = io.load(path), io.load(straight_path)
    for name in ("model_params", "head_params", "model_slots", "head_slots", "state", "losses"):
        np.testing.assert_array_equal(finished.arrays[name], reference.arrays[name])


def test_resume_extends_a_finished_run(backend, tmp_path, capsys):
    path = tmp_path / "run.npz"
    run_json(capsys, SMALL + ["--epochs", "1", "--backend", backend, "--save", str(path)])
    summary, _ = run_json(capsys, ["echo", "--resume", str(path), "--epochs", "2", "--backend", backend])
    assert summary["windows"] == 40
    straight, _ = run_json(capsys, SMALL + ["--epochs", "2", "--backend", backend])
    assert summary["loss"] == straight["loss"]


def test_resume_rejects_changed_settings(backend, tmp_path, capsys):
    path = tmp_path / "run.npz"
    run_json(capsys, SMALL + ["--epochs", "1", "--backend", backend, "--save", str(path)])
    with pytest.raises(SystemExit) as raised:
        main(["echo", "--resume", str(path), "--units", "8"])
    assert raised.value.code == 2
    assert "--units 8 differs from the value 4 stored in" in capsys.readouterr().err


def test_python_m_runs_the_same_command(backend, capsys):
    in_process, _ = run_json(capsys, SMALL + ["--epochs", "1", "--backend", backend])
    environment = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = root + os.pathsep + environment.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-m", "fastlstm"] + SMALL + ["--epochs", "1", "--backend", backend,
                                                                          "--json", "--quiet"],
                            capture_output=True, text=True, env=environment, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["loss"] == in_process["loss"]
    assert summary["accuracy"] == in_process["accuracy"]
