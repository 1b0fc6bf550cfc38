"""Split the benchmark's training step of ptb-medium into forward, backward and the Adagrad update.

    python bench/profile_train_step.py [--threads N]

The step is the one `bench/compare.py` times for L2-H650-B20-T35-train on the C backend: a forward
pass that keeps the tape, the backward pass, and fastlstm.optim.Adagrad's update in numpy. Prints
the median of 7 steps for each part.
"""

import argparse
import time

import numpy as np

import fastlstm
from fastlstm.optim import Adagrad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for fastlstm and BLAS (default 1)")
    args = parser.parse_args(argv)
    import threadpoolctl

    threadpoolctl.threadpool_limits(args.threads)
    fastlstm.set_num_threads(args.threads)

    steps, batch, hidden = 35, 20, 650
    model = fastlstm.LSTM(hidden, hidden, 2, backend="c", seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, batch, hidden)).astype(np.float32)
    d_y = rng.normal(size=(steps, batch, hidden)).astype(np.float32)
    state = model.zero_state(batch)
    optimizer = Adagrad(0.1)
    _, tape = model.forward(x, state.copy(), time_major=True, keep_tape=True)
    grads = model.backward(tape, d_y)

    times = {"forward": [], "backward": [], "update": []}
    for _ in range(7):
        start = time.perf_counter()
        model.forward(x, state, time_major=True, keep_tape=True, tape=tape)
        forward_done = time.perf_counter()
        grads.params[...] = 0.0
        model.backward(tape, d_y, grads=grads)
        backward_done = time.perf_counter()
        optimizer.update(model.params, grads.params)
        update_done = time.perf_counter()
        times["forward"].append(forward_done - start)
        times["backward"].append(backward_done - forward_done)
        times["update"].append(update_done - backward_done)
    print(", ".join(f"{part} {1e3 * np.median(values):.1f} ms" for part, values in times.items()))


if __name__ == "__main__":
    main()
