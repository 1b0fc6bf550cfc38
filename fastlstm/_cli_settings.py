"""Settings of a command-line training run, shared by ``fastlstm echo`` and ``fastlstm charlm``."""

import sys


def load_resume_checkpoint(command, path):
    """Load the checkpoint named by ``--resume``; return it, or None (after printing why) on failure.

    ``command`` is the subcommand's name for the message, such as ``"echo"``.
    """
    from fastlstm import io

    try:
        return io.load(path)
    except (FileNotFoundError, ValueError) as error:
        print(f"fastlstm {command}: error: cannot resume: {error}", file=sys.stderr)
        return None


def merge_settings(parser, args, checkpoint, defaults, default_epochs, task, error):
    """Merge the defaults, a checkpoint's stored settings and the options given on the command line.

    ``defaults`` maps each setting (an argparse destination) to its default. Without a checkpoint the
    given options override the defaults. With one, its stored settings replace the defaults, and a
    given option that differs from a stored value is a usage error, because the resumed run would
    not be the one that was saved; only ``--epochs`` may change, to extend the run. Raises ``error``
    when the checkpoint was written by another task. Returns a new dict with ``epochs`` added.
    """
    given = {name: getattr(args, name) for name in defaults if getattr(args, name) is not None}
    if checkpoint is None:
        settings = dict(defaults)
        settings["epochs"] = default_epochs
    else:
        stored = checkpoint.config
        if not isinstance(stored, dict) or stored.get("task") != task:
            raise error(f"{checkpoint.path} was not written by 'fastlstm {task}'")
        settings = {name: stored.get(name) for name in defaults}
        settings["epochs"] = stored.get("epochs", default_epochs)
        for name, value in given.items():
            if settings[name] != value:
                option = "--" + name.replace("_", "-")
                parser.error(f"{option} {value} differs from the value {settings[name]!r} stored in "
                             f"{checkpoint.path}; leave {option} out to resume that run")
    settings.update(given)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    return settings
