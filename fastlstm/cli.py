"""The ``fastlstm`` command line (also ``python -m fastlstm``).

Subcommands:

``echo``
    Train an LSTM on the echo task (see ``fastlstm.tasks.echo``) with truncated BPTT, evaluate it on a
    held-out series and print the results. The defaults are those of the original TensorFlow program.
    The model has 3 layers of 4 units and a dense softmax head over 2 classes. Each epoch trains on a
    new series of 50000 bits echoed after 3 steps, in 5 rows and windows of 15 steps, with Adagrad at
    learning rate 0.3, for 100 epochs.

``charlm``
    Train a character-level language model on the prose of Python's reference documentation (or
    Shakespeare, or a text file) and print bits per character and a sample; see
    ``fastlstm.charlm_cli``.

``bench``
    Time fastlstm against the other LSTM implementations installed here; a short run (``--quick``)
    unless ``--full`` is given. The options are those of ``fastlstm.bench.run_bench``.

``main(argv)`` returns the exit status: 0 on success, 1 when a checkpoint cannot be used, 2 for invalid
options (argparse's convention) and 130 after an interrupt (Ctrl-C).
"""

import argparse
import json
import logging
import math
import sys
import time

import numpy as np

from fastlstm._cli_settings import load_resume_checkpoint, merge_settings
from fastlstm.tasks import echo as echo_task

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

OPTIMIZERS = ("adagrad", "sgd", "adam")

# Settings of the echo run that a checkpoint fixes. Resuming with a different value for any of them is
# an error, because the run would no longer be the one that was interrupted.
ECHO_DEFAULTS = {
    "length": echo_task.DEFAULT_LENGTH,
    "echo_step": echo_task.DEFAULT_ECHO_STEP,
    "batch_size": echo_task.DEFAULT_BATCH_SIZE,
    "window": 15,
    "layers": 3,
    "units": 4,
    "optimizer": "adagrad",
    "learning_rate": None,
    "clip_norm": None,
    "dtype": "float32",
    "seed": None,
}
DEFAULT_EPOCHS = 100
DEFAULT_LEARNING_RATES = {"adagrad": 0.3, "sgd": 0.3, "adam": 0.001}


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser():
    """Return the ``fastlstm`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="fastlstm", description="Fused CPU LSTM kernels: training tasks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    echo = commands.add_parser(
        "echo", help="train a stacked LSTM to echo a random bit series",
        description="Train a stacked LSTM with a softmax head to output its input bits delayed by "
                    "--echo-step steps, using truncated BPTT, then evaluate it on a held-out series. "
                    "Options that shape the run are taken from the checkpoint with --resume.")
    echo.add_argument("--epochs", type=_positive_int, default=None,
                      help=f"total number of epochs, one new series each (default {DEFAULT_EPOCHS}, or the "
                           f"checkpoint's with --resume)")
    echo.add_argument("--length", type=_positive_int, default=None,
                      help=f"bits per series, a multiple of --batch-size (default {ECHO_DEFAULTS['length']})")
    echo.add_argument("--echo-step", type=_non_negative_int, default=None,
                      help=f"delay of the target in steps (default {ECHO_DEFAULTS['echo_step']})")
    echo.add_argument("--batch-size", type=_positive_int, default=None,
                      help=f"number of rows the series is cut into (default {ECHO_DEFAULTS['batch_size']})")
    echo.add_argument("--window", type=_positive_int, default=None,
                      help=f"steps per truncated-BPTT window (default {ECHO_DEFAULTS['window']})")
    echo.add_argument("--layers", type=_positive_int, default=None,
                      help=f"stacked LSTM layers (default {ECHO_DEFAULTS['layers']})")
    echo.add_argument("--units", type=_positive_int, default=None,
                      help=f"hidden units per layer (default {ECHO_DEFAULTS['units']})")
    echo.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                      help="optimizer (default adagrad, with TensorFlow 1.x semantics)")
    echo.add_argument("--learning-rate", type=_positive_float, default=None,
                      help="learning rate (default 0.3 for adagrad and sgd, 0.001 for adam)")
    echo.add_argument("--clip-norm", type=_positive_float, default=None,
                      help="clip the gradients to this global norm (default: no clipping)")
    echo.add_argument("--dtype", choices=("float32", "float64"), default=None,
                      help="floating-point type of parameters and states (default float32)")
    echo.add_argument("--seed", type=_non_negative_int, default=None,
                      help="seed of the data and the initial weights (default: fresh entropy, printed)")
    echo.add_argument("--backend", choices=("auto", "c", "numba"), default="auto",
                      help="kernel backend (default auto: FASTLSTM_BACKEND, else c if built, else numba)")
    echo.add_argument("--log-every", type=_positive_int, default=100,
                      help="print the window loss every this many windows (default 100)")
    echo.add_argument("--plot", metavar="PATH",
                      help="write a PNG with the loss curve and the last window's bits to PATH")
    echo.add_argument("--save", metavar="PATH",
                      help="write a checkpoint to PATH after every epoch, at the end and on Ctrl-C")
    echo.add_argument("--resume", metavar="PATH", help="continue the run stored in the checkpoint at PATH")
    echo.add_argument("--quiet", action="store_true",
                      help="print only the final results (no progress bar, no loss lines)")
    echo.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    echo.add_argument("--json", action="store_true",
                      help="print a one-line JSON summary as the last line of output")
    echo.set_defaults(handler=run_echo, command_parser=echo)

    from fastlstm import charlm_cli

    charlm_cli.add_parser(commands)

    # main hands the arguments of 'bench' to fastlstm.bench unparsed; this entry lists it in --help.
    commands.add_parser("bench", add_help=False,
                        help="time fastlstm against the installed peers (a short run; --full for the "
                             "whole comparison; fastlstm bench --help lists the options)")
    return parser


def main(argv=None):
    """Run the ``fastlstm`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Each subcommand reports its own usage errors, so the usage line names the subcommand.
    return args.handler(args.command_parser, args)


def _run_bench(options):
    from fastlstm.bench import run_bench

    if "--full" in options:
        options = [option for option in options if option != "--full"]
    elif "--quick" not in options and not {"-h", "--help"} & set(options):
        options = ["--quick"] + options
    return run_bench(options)


# The echo command.


def _echo_settings(parser, args, checkpoint):
    settings = merge_settings(parser, args, checkpoint, ECHO_DEFAULTS, DEFAULT_EPOCHS, "echo",
                              _CheckpointError)
    if settings["learning_rate"] is None:
        settings["learning_rate"] = DEFAULT_LEARNING_RATES[settings["optimizer"]]
    if settings["seed"] is None:
        settings["seed"] = int(np.random.SeedSequence().entropy)

    if settings["length"] % settings["batch_size"] != 0:
        parser.error(f"--length {settings['length']} must be a multiple of --batch-size {settings['batch_size']}")
    columns = settings["length"] // settings["batch_size"]
    if settings["window"] > columns:
        parser.error(f"--window {settings['window']} must be at most the row length --length / --batch-size "
                     f"= {columns}")
    if settings["echo_step"] >= settings["length"]:
        parser.error(f"--echo-step {settings['echo_step']} must be less than --length {settings['length']}")
    return settings


class _CheckpointError(Exception):
    pass


def _build_run(settings, backend):
    # Return (task, trainer) for the settings; the model and head are drawn from the seed.
    import fastlstm.heads
    import fastlstm.model
    import fastlstm.optim
    import fastlstm.train

    data_seed, init_seed = np.random.SeedSequence(settings["seed"]).spawn(2)
    task = echo_task.EchoTask(settings["length"], settings["echo_step"], settings["batch_size"], seed=data_seed,
                              dtype=settings["dtype"])
    init_rng = np.random.default_rng(init_seed)
    model = fastlstm.model.LSTM(1, settings["units"], settings["layers"], dtype=settings["dtype"],
                                backend=backend, seed=init_rng)
    head = fastlstm.heads.SoftmaxHead(settings["units"], 2, dtype=settings["dtype"], backend=backend,
                                      seed=init_rng, kernel_init="uniform")
    optimizer_class = {"adagrad": fastlstm.optim.Adagrad, "sgd": fastlstm.optim.SGD,
                       "adam": fastlstm.optim.Adam}[settings["optimizer"]]
    optimizer = optimizer_class(settings["learning_rate"], clip_norm=settings["clip_norm"])
    trainer = fastlstm.train.Trainer(model, head, optimizer, window=settings["window"], progress=False)
    return task, trainer


def _print(text, quiet):
    if not quiet:
        from tqdm import tqdm

        # tqdm.write keeps an active progress bar intact below the printed line.
        tqdm.write(text, file=sys.stdout)


def _echo_callback(args, settings, task, trainer):
    from fastlstm.train import Callback

    class EchoProgress(Callback):
        def on_epoch_begin(self, trainer, epoch):
            _print(f"epoch {epoch + 1}/{settings['epochs']}", args.quiet)

        def on_window_end(self, trainer, loss):
            index = trainer.window_in_epoch - 1
            if index % args.log_every == 0:
                _print(f"  window {index:5d}  loss {loss:.6f}", args.quiet)

        def on_epoch_end(self, trainer, epoch, mean_loss):
            _print(f"  mean loss {mean_loss:.6f}", args.quiet)
            if args.save:
                _save(args.save, settings, task, trainer)

    return EchoProgress()


def _save(path, settings, task, trainer):
    from fastlstm import io

    config = dict(settings, task="echo")
    io.save(path, trainer, rng_state=task.rng_state(repeat_last_series=trainer.window_in_epoch > 0),
            config=config)


def run_echo(parser, args):
    """Run ``fastlstm echo``; return the exit status."""
    from fastlstm import io

    checkpoint = None
    if args.resume:
        checkpoint = load_resume_checkpoint("echo", args.resume)
        if checkpoint is None:
            return EXIT_FAILURE
    try:
        settings = _echo_settings(parser, args, checkpoint)
        task, trainer = _build_run(settings, args.backend)
        if checkpoint is not None:
            io.restore(checkpoint, trainer)
            task.set_rng_state(checkpoint.rng_state)
    except (_CheckpointError, ValueError) as error:
        reason = "cannot resume: " if checkpoint is not None else ""
        print(f"fastlstm echo: error: {reason}{error}", file=sys.stderr)
        return EXIT_FAILURE
    except ImportError as error:
        print(f"fastlstm echo: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    if checkpoint is not None and checkpoint.metadata["model"].get("backend") != trainer.model.backend:
        logger.warning("the checkpoint was written with backend %r and this run uses %r: the result agrees only "
                       "up to rounding with an uninterrupted run", checkpoint.metadata["model"].get("backend"),
                       trainer.model.backend)

    trainer.progress = not (args.quiet or args.no_progress)
    trainer.callbacks.append(_echo_callback(args, settings, task, trainer))
    trainer.log_every = args.log_every
    resumed = "" if checkpoint is None else f", resumed at epoch {trainer.epoch + 1} window {trainer.window_in_epoch}"
    _print(f"fastlstm echo: {settings['layers']} layers x {settings['units']} units, batch {settings['batch_size']}, "
           f"windows of {settings['window']}, {trainer.optimizer!r}, {settings['dtype']}, backend "
           f"{trainer.model.backend}, seed {settings['seed']}{resumed}", args.quiet)

    remaining = settings["epochs"] - trainer.epoch
    windows_before = trainer.windows
    started = time.perf_counter()
    try:
        if remaining > 0:
            trainer.fit(task.series, epochs=remaining)
    except KeyboardInterrupt:
        message = (f"fastlstm echo: interrupted at epoch {trainer.epoch + 1} window {trainer.window_in_epoch}")
        if args.save:
            _save(args.save, settings, task, trainer)
            message += f"; checkpoint written to {args.save}, continue with --resume {args.save}"
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - started
    trained = trainer.windows - windows_before
    if args.save:
        _save(args.save, settings, task, trainer)

    if not trainer.epoch_losses:
        print("fastlstm echo: error: no epoch has been trained, so there is nothing to evaluate",
              file=sys.stderr)
        return EXIT_FAILURE
    x_held_out, y_held_out = task.held_out_series()
    held_out = trainer.evaluate(x_held_out, y_held_out, mask=task.accuracy_mask())
    last_loss = trainer.epoch_losses[-1]
    speed = trained / elapsed if elapsed > 0 else 0.0
    print(f"last epoch mean loss: {last_loss:.6f}")
    print(f"held-out accuracy (positions >= echo step {settings['echo_step']}): {100 * held_out['accuracy']:.3f}% "
          f"(loss {held_out['loss']:.6f})")
    print(f"trained {trained} windows in {elapsed:.2f} s ({speed:.0f} windows/s)")

    if args.plot:
        if trainer._last_window is None:
            print("fastlstm echo: no window was trained in this run, so --plot has no window to show",
                  file=sys.stderr)
        else:
            write_plot(args.plot, trainer)
    if args.json:
        summary = {
            "loss": last_loss,
            "accuracy": held_out["accuracy"],
            "held_out_loss": held_out["loss"],
            "epochs": trainer.epoch,
            "windows": trainer.windows,
            "windows_per_second": speed,
            "seconds": elapsed,
            "backend": trainer.model.backend,
            "seed": settings["seed"],
        }
        print(json.dumps(summary))
    return EXIT_OK


def write_plot(path, trainer):
    """Write a PNG: the window-loss curve, then per batch row the last window's input, target and prediction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, y, probs = trainer.last_window()
    batch_size, steps = y.shape
    predicted = probs.argmax(axis=-1)
    columns = min(3, batch_size + 1)
    rows = math.ceil((batch_size + 1) / columns)
    figure = Figure(figsize=(5 * columns, 3 * rows))
    FigureCanvasAgg(figure)

    axes = figure.add_subplot(rows, columns, 1)
    axes.plot(np.arange(trainer.windows), trainer.losses, linewidth=0.5)
    axes.set_title("loss per window")
    axes.set_xlabel("window")
    axes.set_ylabel("cross-entropy")

    positions = np.arange(steps)
    width = 0.28
    for row in range(batch_size):
        axes = figure.add_subplot(rows, columns, row + 2)
        axes.bar(positions - width, x[row, :, 0], width, color="tab:blue", label="input")
        axes.bar(positions, y[row], width, color="tab:red", label="target")
        axes.bar(positions + width, predicted[row], width, color="tab:green", label="predicted")
        axes.set_title(f"batch row {row}, last window")
        axes.set_xlabel("step")
        axes.set_ylim(0, 1.2)
        if row == 0:
            axes.legend(loc="upper right", fontsize="small", ncol=3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
