"""Long runs (marked slow): a million training windows and a thousand models without memory growth.

Run with ``python -m pytest tests/test_soak.py -m slow -s``; each test prints what it measured.
"""

import gc
import time

import numpy as np
import pytest

import fastlstm
from fastlstm.tasks import EchoTask

pytestmark = pytest.mark.slow

MEGABYTE = 1 << 20


def resident_bytes():
    """The process's resident set size, from /proc (Linux only)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except OSError:
        pytest.skip("resident memory is read from /proc/self/statm, which this platform lacks")
    import resource

    return pages * resource.getpagesize()


# Window lengths alternate window by window with the state carried across them, so the trainer replaces
# its window buffers on every window. The batch size alternates every BLOCK windows, which starts a new
# series and replaces the state buffer.
STEPS = (15, 7, 22)
BATCHES = (5, 8)
BLOCK = 1000
WINDOWS = 1_000_000
WARM_UP = 20_000


def test_echo_soak(backend):
    """Train the echo task for a million windows of alternating length and batch; memory stays flat."""
    model = fastlstm.LSTM(1, 4, 3, backend=backend, seed=0)
    head = fastlstm.SoftmaxHead(4, 2, backend=backend, seed=0, kernel_init="uniform")
    trainer = fastlstm.Trainer(model, head, fastlstm.Adagrad(0.3), window=15, progress=False)
    series = {batch: EchoTask(length=sum(STEPS) * 200, batch_size=batch, seed=batch).series()
              for batch in BATCHES}

    start = time.perf_counter()
    baseline = history_at_baseline = None
    losses = np.full(WINDOWS, np.nan)  # written now, so that its pages count before the baseline
    position = 0
    for window in range(WINDOWS):
        batch = BATCHES[(window // BLOCK) % len(BATCHES)]
        steps = STEPS[window % len(STEPS)]
        x, y = series[batch]
        if window % BLOCK == 0 or position + steps > x.shape[1]:
            trainer.reset_state(batch)
            position = 0
        losses[window] = trainer.train_window(x[:, position:position + steps], y[:, position:position + steps])
        position += steps
        if window == WARM_UP:
            gc.collect()
            baseline = resident_bytes()
            history_at_baseline = trainer.losses.base.nbytes
    gc.collect()
    growth = resident_bytes() - baseline
    # Trainer.losses keeps every window's loss (8 bytes per window, in a buffer that doubles), which
    # is documented, so its growth is taken out of the figure that must stay below 1 MB.
    history = trainer.losses.base.nbytes - history_at_baseline
    growth -= history
    elapsed = time.perf_counter() - start
    first, last = losses[:BLOCK].mean(), losses[-30000:].mean()
    print(f"\n[{backend}] {WINDOWS} windows in {elapsed:.1f} s ({WINDOWS / elapsed:.0f} windows/s); "
          f"resident memory after warm-up grew by {(growth + history) / 1024:.0f} KiB, "
          f"{history / 1024:.0f} KiB of it the trainer's loss history; "
          f"mean loss {first:.4f} over the first {BLOCK} windows, {last:.6f} over the last 30,000")
    assert np.all(np.isfinite(losses))
    assert trainer.windows == WINDOWS
    assert growth < MEGABYTE
    assert last < 0.5 * first


def _use_model(backend, seed):
    model = fastlstm.LSTM(8, 32, 2, backend=backend, seed=seed)
    state = model.zero_state(4)
    x = np.ones((4, 10, 8), dtype=np.float32)
    y, tape = model.forward(x, state, keep_tape=True)
    model.backward(tape, y)
    model.step(x[:, 0], state)


def test_dropped_models_return_memory(backend):
    for seed in range(50):
        _use_model(backend, seed)
    gc.collect()
    baseline = resident_bytes()
    for seed in range(1000):
        _use_model(backend, seed)
    gc.collect()
    growth = resident_bytes() - baseline
    print(f"\n[{backend}] 1000 models created and dropped: resident memory grew by {growth / 1024:.0f} KiB")
    assert growth < MEGABYTE
