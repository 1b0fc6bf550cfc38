"""Time fastlstm's training windows of the character model that bench/charlm_vs_torch.py compares.

    python bench/profile_charlm_window.py [--threads N] [--windows W] [--seed S]

The model and data are those of the comparison: 2 layers of 256 units over the characters of the
built-in corpus, and windows of 64 characters in 32 streams. It trains with Adam at 0.002 and
clipping at 5, one fused native call per window. Prints the median time of a window in each block of 50 and over all of
them. Only fastlstm runs, so two builds or two settings compare in one sitting without PyTorch's
threads in the way. The machine's speed can drift over hours, so compare runs made minutes apart.
"""

import argparse
import os
import time

BLOCK = 50   # windows per printed median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="fastlstm's threads (default 2)")
    parser.add_argument("--windows", type=int, default=200, help="training windows to time (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.windows < 1:
        parser.error(f"--threads and --windows must be at least 1, got {args.threads} and {args.windows}")
    # Before numpy loads OpenBLAS, which reads this once (the fused window does not call it).
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

    import numpy as np

    import fastlstm
    from fastlstm import optim
    from fastlstm.charlm import CharLM, CharLMTrainer
    from fastlstm.tasks import text

    fastlstm.set_num_threads(args.threads)
    window, batch = 64, 32
    data = text.TextData.load("pydoc")
    rows = text.batchify(data.train, batch)
    windows_per_epoch = text.num_windows(rows, window)
    model = CharLM(len(data.vocab), 256, 2, backend="c", seed=args.seed)
    trainer = CharLMTrainer(model, optim.Adam(0.002, clip_norm=5.0), window)

    seconds = []
    for k in range(args.windows):
        index = k % windows_per_epoch
        if index == 0:
            trainer.reset_state(batch)
        inputs, targets = text.window_pair(rows, index, window)
        start = time.perf_counter()
        trainer.train_window(inputs, targets)
        seconds.append(time.perf_counter() - start)

    ms = np.array(seconds) * 1e3
    blocks = [f"{np.median(ms[k:k + BLOCK]):.1f}" for k in range(0, len(ms), BLOCK)]
    print(f"{args.threads} thread(s), {args.windows} windows: median {np.median(ms):.2f} ms per window; "
          f"per block of {BLOCK}: {', '.join(blocks)} ms")


if __name__ == "__main__":
    main()
