"""The C backend's thread pool: results independent of the thread count, the setting's checks,
Python threads sharing the pool, and a forked child that keeps working."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import reference
from helpers import assert_close, assert_matches_reference, make_model, random_inputs, reference_forward

import fastlstm

pytestmark = pytest.mark.skipif(not fastlstm.backends()["c"]["available"],
                                reason="the C backend is not available")

# Large enough that the pool splits every product and the cell: weights of 64 * 512 and
# 128 * 512 elements, and 16 rows per step.
INPUT, HIDDEN, LAYERS, BATCH, STEPS = 64, 128, 2, 16, 8


@pytest.fixture
def threads():
    """Restores the thread setting after the test."""
    before = fastlstm.get_num_threads()
    yield fastlstm.set_num_threads
    fastlstm.set_num_threads(before)


def _window(dtype, x, state, labels):
    """Forward, backward, a step and a fused training window of fresh models; every result that a
    thread count could touch."""
    model = make_model("c", INPUT, HIDDEN, LAYERS, dtype)
    head = fastlstm.SoftmaxHead(HIDDEN, 7, dtype=dtype, backend="c", seed=0)
    state = state.copy()
    y, tape = model.forward(x, state, keep_tape=True)
    grads = model.backward(tape, np.full(y.shape, 0.1, dtype=dtype),
                           np.full(state.shape, 0.1, dtype=dtype))
    stepped = model.step(x[:, 0], state.copy())
    trainer = fastlstm.Trainer(model, head, fastlstm.Adam(0.01), window=x.shape[1], progress=False)
    loss = trainer.train_window(x, labels)
    return {"outputs": y, "state": state, "params gradient": grads.params.copy(),
            "state gradient": grads.initial_state.copy(), "input gradient": grads.inputs.copy(),
            "step": stepped.copy(), "loss": np.array(loss), "trained params": model.params.copy(),
            "trained head": head.params.copy()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_thread_count(threads, dtype):
    x, state = random_inputs(make_model("c", INPUT, HIDDEN, LAYERS, dtype), BATCH, STEPS)
    labels = np.random.default_rng(1).integers(0, 7, size=(BATCH, STEPS))
    threads(1)
    single = _window(dtype, x, state, labels)
    for count in (2, 3):
        threads(count)
        other = _window(dtype, x, state, labels)
        for name in single:
            np.testing.assert_array_equal(other[name], single[name], err_msg=f"{name}, {count} threads")


def _token_windows(dtype, windows, vocab):
    """Parameters and losses after fused training windows of a token-input model with Adam."""
    from fastlstm import optim
    from fastlstm.charlm import CharLM, CharLMTrainer

    model = CharLM(vocab, 128, 2, dtype=dtype, backend="c", seed=0)
    trainer = CharLMTrainer(model, optim.Adam(0.01, clip_norm=1.0), windows[0][0].shape[0])
    losses = [trainer.train_window(inputs, targets) for inputs, targets in windows]
    return {"losses": np.array(losses), "lstm params": model.lstm.params.copy(),
            "head params": model.head.params.copy(), "state": trainer.state.copy()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_windows_do_not_depend_on_thread_count(threads, dtype):
    # T * B = 512 rows of G = 512 columns: enough for the pool to split the embedding gather and
    # scatter, the bias rows and column sums, the packing of dZ and the optimizer update. The
    # products over all rows are split by rows on 2 threads and by columns on 3.
    vocab = 50
    rng = np.random.default_rng(2)
    windows = [(rng.integers(0, vocab, size=(16, 32)), rng.integers(0, vocab, size=(16, 32)))
               for _ in range(2)]
    threads(1)
    single = _token_windows(dtype, windows, vocab)
    for count in (2, 3):
        threads(count)
        other = _token_windows(dtype, windows, vocab)
        for name in single:
            np.testing.assert_array_equal(other[name], single[name], err_msg=f"{name}, {count} threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 2])
# 128 rows of the input products split by columns; 480 rows, a chunk of rows per thread, by rows.
@pytest.mark.parametrize("batch, steps", [(BATCH, STEPS), (24, 20)])
def test_threaded_results_match_reference(threads, dtype, count, batch, steps):
    threads(count)
    model = make_model("c", INPUT, HIDDEN, LAYERS, dtype)
    assert_matches_reference(model, *random_inputs(model, batch, steps))


def test_flush_flags_set_after_the_pool_starts(threads):
    # Other libraries may set the calling thread's flush-to-zero flags once fastlstm's workers run
    # (torch.set_flush_denormal, for one). The workers take the caller's flags for every job, so the
    # results still do not depend on the thread count. Inputs near 1e-37 make subnormal values.
    from fastlstm import _cext

    model = make_model("c", 200, 128, 1, np.float32)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(4, 6, 200)) * 1e-37).astype(np.float32)
    d_y = (rng.normal(size=(4, 6, 128)) * 1e-30).astype(np.float32)

    def gradients(count):
        threads(count)
        _, tape = model.forward(x, model.zero_state(4), keep_tape=True)
        return model.backward(tape, d_y).params.copy()

    plain = gradients(2)   # starts the workers without the flags
    before = _cext._set_flush_subnormals(True)
    if before < 0:
        pytest.skip("this CPU has no flush-to-zero flags")
    try:
        flushed = {count: gradients(count) for count in (1, 2, 3)}
    finally:
        _cext._set_flush_subnormals(bool(before))
    assert not np.array_equal(flushed[1], plain)   # the flags changed some values
    np.testing.assert_array_equal(flushed[2], flushed[1])
    np.testing.assert_array_equal(flushed[3], flushed[1])


@pytest.mark.parametrize("bad, error, message", [
    (0, ValueError, r"threads must be in \[1, 64\], got 0"),
    (65, ValueError, r"threads must be in \[1, 64\], got 65"),
    (-2, ValueError, r"got -2"),
    (2.0, TypeError, r"threads must be an int, got float 2.0"),
    ("2", TypeError, r"threads must be an int, got str '2'"),
    (True, TypeError, r"threads must be an int, got True"),
])
def test_bad_thread_count_is_rejected(threads, bad, error, message):
    threads(3)
    with pytest.raises(error, match=message):
        fastlstm.set_num_threads(bad)
    assert fastlstm.get_num_threads() == 3


def test_numpy_integer_thread_count_is_accepted(threads):
    threads(np.int64(2))
    assert fastlstm.get_num_threads() == 2


def _run_python(code, env_update):
    env = dict(os.environ)
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("variables, expected", [
    ({"FASTLSTM_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}, "3"),
    ({"FASTLSTM_NUM_THREADS": " +2 ", "OMP_NUM_THREADS": "bad"}, "2"),
    ({"FASTLSTM_NUM_THREADS": "", "OMP_NUM_THREADS": "2"}, "2"),
    # OpenMP's own forms: one count per nesting level, and counts above fastlstm's limit.
    ({"FASTLSTM_NUM_THREADS": "", "OMP_NUM_THREADS": "3,2"}, "3"),
    ({"FASTLSTM_NUM_THREADS": "", "OMP_NUM_THREADS": "128"}, "64"),
], ids=["fastlstm-first", "fastlstm-sign", "omp", "omp-nested", "omp-capped"])
def test_default_thread_count_from_environment(variables, expected):
    result = _run_python("import fastlstm; print(fastlstm.get_num_threads())", variables)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("value", ["many", "0", "65", "1_0", "2.0", "\u0662"])
def test_bad_thread_variable_names_it(value):
    code = """
        import numpy as np, fastlstm
        fastlstm.LSTM(2, 3, backend="c")
    """
    result = _run_python(code, {"FASTLSTM_NUM_THREADS": value})
    assert result.returncode != 0
    assert (f"environment variable FASTLSTM_NUM_THREADS must be a whole number in [1, 64], got {value!r}"
            in result.stderr)


def test_python_threads_share_the_pool(threads):
    threads(2)
    model = make_model("c", INPUT, HIDDEN, LAYERS, np.float32)
    inputs = [random_inputs(model, BATCH, STEPS, seed=seed) for seed in range(6)]

    def run(x, state):
        state = state.copy()
        y, tape = model.forward(x, state, keep_tape=True)
        return y, state, model.backward(tape, y).params.copy()

    expected = [run(x, state) for x, state in inputs]
    results = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def worker(index):
        barrier.wait()
        for _ in range(5):
            results[index] = run(*inputs[index])

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
    for worker_thread in workers:
        worker_thread.start()
    for worker_thread in workers:
        worker_thread.join(timeout=300)
        assert not worker_thread.is_alive(), "a thread did not finish: the pool deadlocked"
    for index, (got, want) in enumerate(zip(results, expected)):
        for name, a, b in zip(("outputs", "state", "params gradient"), got, want):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, Python thread {index}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_kernels():
    # The parent's pool threads do not exist in a forked child; the child must start its own
    # instead of waiting forever for them.
    code = """
        import os, sys
        import numpy as np, fastlstm
        fastlstm.set_num_threads(2)
        model = fastlstm.LSTM(64, 128, 2, backend="c", seed=0)
        x = np.random.default_rng(0).normal(size=(16, 8, 64)).astype(np.float32)
        expected = model.forward(x, model.zero_state(16))[0]
        pid = os.fork()
        if pid == 0:
            y = model.forward(x, model.zero_state(16))[0]
            os._exit(0 if np.array_equal(y, expected) else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    result = _run_python(code, {})
    assert result.returncode == 0, result.stderr


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def large_cases(draw):
    """Sizes around the row kernel's blocks: weights from below 4096 elements to 70 * 280, batches
    across tile heights (12) and chunks, column counts off the 16- and 32-column boundaries."""
    return {"input": draw(st.integers(1, 70)), "hidden": draw(st.integers(16, 70)),
            "layers": draw(st.integers(1, 2)), "batch": draw(st.integers(1, 26)),
            "steps": draw(st.integers(1, 3)), "dtype": draw(st.sampled_from([np.float32, np.float64])),
            "threads": draw(st.integers(2, 3)), "seed": draw(st.integers(0, 2**16))}


def _check_large_case(case, threads):
    dtype = case["dtype"]
    model = make_model("c", case["input"], case["hidden"], case["layers"], dtype, seed=case["seed"])
    x, state = random_inputs(model, case["batch"], case["steps"], seed=case["seed"])
    expected_y, expected_state, tape_ref = reference_forward(model, x, state)
    d_y = np.random.default_rng(case["seed"]).normal(size=expected_y.shape).astype(dtype)
    d_params, d_state, d_x = reference.backward(model.params.astype(np.float64), tape_ref,
                                                d_y.transpose(1, 0, 2).astype(np.float64))
    results = {}
    for count in (1, case["threads"]):
        threads(count)
        run_state = state.copy()
        y, tape = model.forward(x, run_state, keep_tape=True)
        grads = model.backward(tape, d_y)
        results[count] = (y, run_state, grads.params.copy(), grads.initial_state.copy(), grads.inputs.copy())
    y, final, params, initial, inputs = results[1]
    assert_close(y, expected_y, dtype, "outputs")
    assert_close(final, expected_state, dtype, "final state")
    assert_close(params, d_params, dtype, "params gradient")
    assert_close(initial, d_state, dtype, "state gradient")
    assert_close(inputs, d_x.transpose(1, 0, 2), dtype, "input gradient")
    for one, many in zip(results[1], results[case["threads"]]):
        np.testing.assert_array_equal(many, one, err_msg=f"{case['threads']} threads against 1")


LARGE_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@settings(max_examples=30, **LARGE_SETTINGS)
@given(case=large_cases())
def test_fuzz_large_products(threads, case):
    _check_large_case(case, threads)


@pytest.mark.slow
@settings(max_examples=2000, **LARGE_SETTINGS)
@given(case=large_cases())
def test_fuzz_large_products_long(threads, case):
    _check_large_case(case, threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_runs_a_kernel():
    # A fork can catch another thread inside a pool job; the child must not wait for that job's
    # workers, which do not exist in it. Each child gets an alarm so that a hang fails the test.
    code = """
        import os, signal, sys, threading
        import numpy as np, fastlstm
        fastlstm.set_num_threads(2)
        model = fastlstm.LSTM(64, 128, 2, backend="c", seed=0)
        x = np.random.default_rng(0).normal(size=(16, 8, 64)).astype(np.float32)
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                model.forward(x, model.zero_state(16))

        thread = threading.Thread(target=busy)
        thread.start()
        hung = 0
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                model.forward(x, model.zero_state(16))
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            hung += os.waitstatus_to_exitcode(status) != 0
        stop.set()
        thread.join()
        sys.exit(hung)
    """
    result = _run_python(code, {})
    assert result.returncode == 0, f"{result.returncode} of 40 children failed or hung; {result.stderr}"
