"""Optimizers against updates computed by hand, and clipping by global norm."""

import math
import tracemalloc

import numpy as np
import pytest

from fastlstm.optim import SGD, Adagrad, Adam, clip_by_global_norm, global_norm

# float64 vectors, so that the only rounding is that of the hand computation's own float64 arithmetic.
W0 = [1.0, -2.0]
G1 = [0.3, -0.4]
G2 = [-0.1, 0.5]


def two_steps(optimizer):
    w = np.array(W0)
    optimizer.update(w, np.array(G1))
    after_one = w.copy()
    optimizer.update(w, np.array(G2))
    return after_one, w


def test_sgd_two_steps():
    after_one, after_two = two_steps(SGD(0.1))
    # w -= 0.1 * g
    np.testing.assert_allclose(after_one, [1.0 - 0.1 * 0.3, -2.0 + 0.1 * 0.4], rtol=1e-15)
    np.testing.assert_allclose(after_two, [0.97 + 0.1 * 0.1, -1.96 - 0.1 * 0.5], rtol=1e-15)


def test_adagrad_two_steps():
    optimizer = Adagrad(0.3)
    after_one, after_two = two_steps(optimizer)
    # Step 1: acc = 0.1 + g1**2 = [0.19, 0.26]; w -= 0.3 * g1 / sqrt(acc).
    step_one = [1.0 - 0.3 * 0.3 / math.sqrt(0.19), -2.0 + 0.3 * 0.4 / math.sqrt(0.26)]
    np.testing.assert_allclose(after_one, step_one, rtol=1e-14)
    # Step 2: acc = [0.19 + 0.01, 0.26 + 0.25] = [0.2, 0.51].
    step_two = [step_one[0] + 0.3 * 0.1 / math.sqrt(0.2), step_one[1] - 0.3 * 0.5 / math.sqrt(0.51)]
    np.testing.assert_allclose(after_two, step_two, rtol=1e-14)
    np.testing.assert_allclose(optimizer.slots[0], [[0.2, 0.51]], rtol=1e-14)
    assert optimizer.iterations == 2


def test_adam_two_steps():
    optimizer = Adam()
    assert (optimizer.learning_rate, optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == \
        (0.001, 0.9, 0.999, 1e-7)
    after_one, after_two = two_steps(optimizer)
    # Step 1: m = 0.1 * g1 = [0.03, -0.04]; v = 0.001 * g1**2 = [0.00009, 0.00016];
    # alpha = 0.001 * sqrt(1 - 0.999) / (1 - 0.9).
    alpha = 0.001 * math.sqrt(0.001) / 0.1
    step_one = [1.0 - alpha * 0.03 / (math.sqrt(0.00009) + 1e-7),
                -2.0 + alpha * 0.04 / (math.sqrt(0.00016) + 1e-7)]
    np.testing.assert_allclose(after_one, step_one, rtol=1e-14)
    # Step 2: m = m + (g2 - m) * 0.1 = [0.03 - 0.013, -0.04 + 0.054] = [0.017, 0.014];
    # v = v + (g2**2 - v) * 0.001 = [0.00009 + 0.00000991, 0.00016 + 0.00024984];
    # alpha = 0.001 * sqrt(1 - 0.999**2) / (1 - 0.9**2) = 0.001 * sqrt(0.001999) / 0.19.
    m = [0.017, 0.014]
    v = [0.00009991, 0.00040984]
    alpha = 0.001 * math.sqrt(0.001999) / 0.19
    step_two = [step_one[0] - alpha * m[0] / (math.sqrt(v[0]) + 1e-7),
                step_one[1] - alpha * m[1] / (math.sqrt(v[1]) + 1e-7)]
    np.testing.assert_allclose(after_two, step_two, rtol=1e-13)
    np.testing.assert_allclose(optimizer.slots[0], [m, v], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slots_layout_for_several_vectors(dtype):
    params = [np.zeros(7, dtype=dtype), np.zeros((2, 3), dtype=dtype)]
    for optimizer, count in ((SGD(0.1), 0), (Adagrad(0.1, initial_accumulator_value=0.25), 1), (Adam(), 2)):
        slots = optimizer.init(params)
        assert [s.shape for s in slots] == [(count, 7), (count, 6)]
        assert all(s.dtype == dtype for s in slots)
        assert all(s.flags.c_contiguous for s in slots)
    np.testing.assert_array_equal(Adagrad(0.1, initial_accumulator_value=0.25).init(params)[1], 0.25)


def test_update_of_several_vectors_equals_separate_updates():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=5), rng.normal(size=3)
    grads = [[rng.normal(size=5), rng.normal(size=3)] for _ in range(3)]
    joint = Adam(0.01)
    separate = [Adam(0.01), Adam(0.01)]
    a2, b2 = a.copy(), b.copy()
    for ga, gb in grads:
        joint.update([a, b], [ga, gb])
        separate[0].update(a2, ga)
        separate[1].update(b2, gb)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_gradients_are_not_modified_by_clipping():
    grads = [np.array([3.0, 4.0]), np.array([12.0])]
    original = [g.copy() for g in grads]
    params = [np.zeros(2), np.zeros(1)]
    SGD(1.0, clip_norm=1.0).update(params, grads)
    for g, o in zip(grads, original):
        np.testing.assert_array_equal(g, o)
    # The global norm is 13, so the applied gradient is g / 13.
    np.testing.assert_allclose(params[0], [-3.0 / 13, -4.0 / 13], rtol=1e-15)
    np.testing.assert_allclose(params[1], [-12.0 / 13], rtol=1e-15)


@pytest.mark.parametrize("make", [lambda c: SGD(0.1, clip_norm=c), lambda c: Adagrad(0.1, clip_norm=c),
                                  lambda c: Adam(0.1, clip_norm=c)])
def test_clip_option_equals_clipping_first(make):
    rng = np.random.default_rng(1)
    params = [rng.normal(size=4), rng.normal(size=2)]
    expected = [p.copy() for p in params]
    clipped, unclipped = make(0.5), make(None)
    for _ in range(3):
        grads = [rng.normal(size=4), rng.normal(size=2)]
        clipped.update(params, grads)
        copies = [g.copy() for g in grads]
        clip_by_global_norm(copies, 0.5)
        unclipped.update(expected, copies)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p, e, rtol=1e-14)


def test_clip_by_global_norm():
    grads = [np.array([3.0]), np.array([[4.0, 0.0]])]
    norm = clip_by_global_norm(grads, 2.5)
    assert norm == 5.0
    np.testing.assert_allclose(grads[0], [1.5], rtol=1e-15)
    np.testing.assert_allclose(grads[1], [[2.0, 0.0]], rtol=1e-15)


def test_clip_by_global_norm_below_threshold_is_unchanged():
    grads = [np.array([0.3, 0.4], dtype=np.float32)]
    assert clip_by_global_norm(grads, 1.0) == pytest.approx(0.5, rel=1e-7)
    np.testing.assert_array_equal(grads[0], np.array([0.3, 0.4], dtype=np.float32))


def test_clip_by_global_norm_non_finite_gives_nan():
    grads = [np.array([np.inf, 1.0]), np.array([2.0])]
    assert math.isinf(clip_by_global_norm(grads, 1.0))
    assert np.isnan(grads[0]).all()
    assert np.isnan(grads[1]).all()


def test_global_norm_sums_in_float64():
    grads = [np.full(1000, 1e-3, dtype=np.float32), np.array([3.0, 4.0], dtype=np.float32)]
    expected = math.sqrt(1000 * float(np.float32(1e-3)) ** 2 + 25.0)
    assert global_norm(grads) == pytest.approx(expected, rel=1e-12)


def test_update_allocates_nothing_after_first_call():
    size = 200_000
    params = [np.zeros(size), np.zeros(10)]
    grads = [np.full(size, 0.5), np.full(10, 0.5)]
    for optimizer in (SGD(0.1, clip_norm=1.0), Adagrad(0.1, clip_norm=1.0), Adam(clip_norm=1.0)):
        optimizer.update(params, grads)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(3):
                optimizer.update(params, grads)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # One temporary vector would be 1.6 MB.
        assert peak - before < 64_000, type(optimizer).__name__


def test_hyper_layout():
    np.testing.assert_array_equal(Adam(0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-6, clip_norm=2.0).hyper,
                                  [0.01, 0.8, 0.99, 1e-6, 2.0])
    np.testing.assert_array_equal(Adagrad(0.3).hyper, [0.3, 0.0, 0.0, 0.0, 0.0])
    assert Adagrad(0.3).hyper.dtype == np.float64
    assert (SGD.code, Adagrad.code, Adam.code) == (0, 1, 2)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="initial_accumulator_value must be > 0"):
        Adagrad(0.1, initial_accumulator_value=0.0)
    with pytest.raises(ValueError, match="initial_accumulator_value must be > 0"):
        Adagrad(0.1, initial_accumulator_value=-1.0)
    with pytest.raises(ValueError, match="learning_rate must be > 0, got 0.0"):
        SGD(0.0)
    with pytest.raises(TypeError, match="learning_rate must be a real number"):
        SGD("0.1")
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        Adam(float("nan"))
    with pytest.raises(ValueError, match="beta_1 must be in"):
        Adam(beta_1=1.0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        SGD(0.1, clip_norm=0.0)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        clip_by_global_norm([np.ones(2)], -1.0)


def test_rejects_mismatched_vectors():
    optimizer = Adagrad(0.1)
    optimizer.update([np.zeros(3)], [np.ones(3)])
    with pytest.raises(ValueError, match=r"params\[0\] must have size 3"):
        optimizer.update([np.zeros(4)], [np.ones(4)])
    with pytest.raises(ValueError, match="initialised with"):
        optimizer.update([np.zeros(3), np.zeros(3)], [np.ones(3), np.ones(3)])
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape"):
        optimizer.update([np.zeros(3)], [np.ones(2)])
    with pytest.raises(ValueError, match="one array per parameter vector"):
        optimizer.update([np.zeros(3)], [])
    with pytest.raises(TypeError, match="float32 or float64"):
        optimizer.update([np.zeros(3, dtype=np.int64)], [np.ones(3, dtype=np.int64)])
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        optimizer.update([read_only], [np.ones(3)])
    optimizer.reset()
    optimizer.update([np.zeros(4)], [np.ones(4)])
    assert optimizer.slots[0].shape == (1, 4)


@pytest.mark.tensorflow
def test_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=6).astype(np.float32)
    grads = [rng.normal(size=6).astype(np.float32) for _ in range(4)]

    def run_ours(optimizer):
        w = w0.copy()
        for g in grads:
            optimizer.update(w, g)
        return w

    def run_tf(optimizer):
        variable = tf.Variable(w0)
        for g in grads:
            optimizer.apply_gradients([(tf.constant(g), variable)])
        return variable.numpy()

    np.testing.assert_allclose(run_ours(Adam(0.01)), run_tf(tf.keras.optimizers.Adam(0.01)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(run_ours(SGD(0.1)), run_tf(tf.keras.optimizers.SGD(0.1)), rtol=1e-5, atol=1e-6)
    # TensorFlow 1.x Adagrad through the compat API: no epsilon, accumulator starting at 0.1.
    variable = tf.Variable(w0)
    tf1_adagrad = tf.compat.v1.train.AdagradOptimizer(0.3, initial_accumulator_value=0.1)
    for g in grads:
        tf1_adagrad.apply_gradients([(tf.constant(g), variable)])
    np.testing.assert_allclose(run_ours(Adagrad(0.3)), variable.numpy(), rtol=1e-5, atol=1e-6)
