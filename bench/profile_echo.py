"""Run fused echo training windows for a profiler.

    valgrind --tool=callgrind --callgrind-out-file=echo.callgrind python bench/profile_echo.py
    callgrind_annotate echo.callgrind | head -30

The echo model of BENCHMARKS.md (3 layers of 4 units, batch 5, windows of 15 steps, a 2-class
softmax head, Adagrad at 0.3) trains ``--windows`` windows on the C backend through
``Trainer.train_window``, which makes one native call per window. Dividing a function's instruction
count by the number of windows gives its cost per window. The Python around the calls is counted
under libpython, not in the native functions.
"""

import argparse

import numpy as np

import fastlstm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=500, help="training windows (default 500)")
    parser.add_argument("--backend", default="c", help="fastlstm backend (default c)")
    args = parser.parse_args(argv)

    model = fastlstm.LSTM(1, 4, 3, backend=args.backend, seed=0)
    head = fastlstm.SoftmaxHead(4, 2, backend=args.backend, seed=0)
    trainer = fastlstm.Trainer(model, head, fastlstm.Adagrad(0.3), window=15, progress=False)
    if not trainer.fused:
        raise SystemExit("the trainer did not take the fused train_window path")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(5, 15, 1)).astype(np.float32)
    labels = rng.integers(0, 2, size=(5, 15))
    for _ in range(args.windows):
        trainer.train_window(x, labels)
    print(f"{args.windows} windows, last loss {trainer.losses[-1]:.6f}")


if __name__ == "__main__":
    main()
