"""SoftmaxHead against a numpy softmax cross-entropy and against finite differences."""

import numpy as np
import pytest
from conftest import ATOL, RTOL

from fastlstm.heads import SoftmaxHead

# H and C differ, so that a transposed kernel cannot go unnoticed.
HIDDEN, CLASSES = 3, 5


def reference_softmax_xent(hidden, kernel, bias, labels):
    """Return (loss, probs, d_hidden, d_kernel, d_bias) of the mean cross-entropy, in float64."""
    hidden = hidden.astype(np.float64)
    kernel = kernel.astype(np.float64)
    logits = hidden @ kernel + bias.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probs = exp / exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = -np.log(probs[rows, labels]).mean()
    d_logits = probs.copy()
    d_logits[rows, labels] -= 1.0
    d_logits /= len(labels)
    return loss, probs, d_logits @ kernel.T, hidden.T @ d_logits, d_logits.sum(axis=0)


def make_head(backend, dtype, seed=0):
    head = SoftmaxHead(HIDDEN, CLASSES, dtype=dtype, backend=backend, seed=seed)
    head.bias[...] = np.random.default_rng(seed + 100).normal(size=CLASSES)
    return head


def make_inputs(dtype, rows=7, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, HIDDEN)).astype(dtype), rng.integers(0, CLASSES, size=rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_numpy(backend, dtype):
    head = make_head(backend, dtype)
    hidden, labels = make_inputs(dtype)
    loss, probs = head.forward(hidden, labels)
    expected_loss, expected_probs, *_ = reference_softmax_xent(hidden, head.kernel, head.bias, labels)
    dtype = np.dtype(dtype)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected_loss, rel=RTOL[dtype], abs=ATOL[dtype])
    assert probs.dtype == dtype
    np.testing.assert_allclose(probs, expected_probs, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_matches_numpy(backend, dtype):
    head = make_head(backend, dtype)
    hidden, labels = make_inputs(dtype)
    start = np.full(head.params.shape, 0.5, dtype=dtype)
    grad = start.copy()
    result = head.backward(hidden, labels, grad=grad)
    loss, probs, d_hidden, d_kernel, d_bias = reference_softmax_xent(hidden, head.kernel, head.bias, labels)
    dtype = np.dtype(dtype)
    assert result.params is grad
    assert result.loss == pytest.approx(loss, rel=RTOL[dtype], abs=ATOL[dtype])
    np.testing.assert_allclose(result.probs, probs, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(result.hidden, d_hidden, rtol=RTOL[dtype], atol=ATOL[dtype])
    # The parameter gradient is added to what grad held.
    np.testing.assert_allclose(grad[:HIDDEN * CLASSES], start[:HIDDEN * CLASSES] + d_kernel.ravel(),
                               rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(grad[HIDDEN * CLASSES:], start[HIDDEN * CLASSES:] + d_bias,
                               rtol=RTOL[dtype], atol=ATOL[dtype])


def test_backward_matches_finite_differences(backend):
    head = make_head(backend, np.float64)
    hidden, labels = make_inputs(np.float64, rows=6, seed=3)
    result = head.backward(hidden, labels)
    step = 1e-6

    numeric = np.empty_like(head.params)
    for index in range(head.params.size):
        saved = head.params[index]
        head.params[index] = saved + step
        plus = head.forward(hidden, labels)[0]
        head.params[index] = saved - step
        minus = head.forward(hidden, labels)[0]
        head.params[index] = saved
        numeric[index] = (plus - minus) / (2 * step)
    np.testing.assert_allclose(result.params, numeric, rtol=1e-6, atol=1e-9)

    numeric_hidden = np.empty_like(hidden)
    for index in np.ndindex(hidden.shape):
        shifted = hidden.copy()
        shifted[index] += step
        plus = head.forward(shifted, labels)[0]
        shifted[index] -= 2 * step
        minus = head.forward(shifted, labels)[0]
        numeric_hidden[index] = (plus - minus) / (2 * step)
    np.testing.assert_allclose(result.hidden, numeric_hidden, rtol=1e-6, atol=1e-9)


def test_leading_dimensions_are_kept(backend):
    head = make_head(backend, np.float32)
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(2, 4, HIDDEN)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(2, 4))
    result = head.backward(hidden, labels)
    flat = head.backward(hidden.reshape(8, HIDDEN), labels.reshape(8))
    assert result.probs.shape == (2, 4, CLASSES)
    assert result.hidden.shape == (2, 4, HIDDEN)
    np.testing.assert_array_equal(result.probs.reshape(8, CLASSES), flat.probs)
    np.testing.assert_array_equal(result.hidden.reshape(8, HIDDEN), flat.hidden)
    assert result.loss == flat.loss


def test_output_buffers_are_the_callers(backend):
    head = make_head(backend, np.float32)
    hidden, labels = make_inputs(np.float32)
    probs = np.empty((len(labels), CLASSES), dtype=np.float32)
    d_hidden = np.empty_like(hidden)
    result = head.backward(hidden, labels, probs=probs, d_hidden=d_hidden)
    assert np.shares_memory(result.probs, probs)
    assert np.shares_memory(result.hidden, d_hidden)


def test_predict_is_forward_probabilities(backend):
    head = make_head(backend, np.float64)
    hidden, labels = make_inputs(np.float64)
    np.testing.assert_array_equal(head.predict(hidden), head.forward(hidden, labels)[1])


def test_params_layout_and_views(backend):
    head = SoftmaxHead(HIDDEN, CLASSES, backend=backend)
    assert head.params.shape == (HIDDEN * CLASSES + CLASSES,)
    head.params = np.arange(head.params.size, dtype=np.float32)
    assert head.kernel.shape == (HIDDEN, CLASSES)
    assert head.kernel[1, 2] == 1 * CLASSES + 2
    np.testing.assert_array_equal(head.bias, np.arange(HIDDEN * CLASSES, HIDDEN * CLASSES + CLASSES))
    assert np.shares_memory(head.kernel, head.params)
    assert np.shares_memory(head.bias, head.params)


def test_kernel_inits(backend):
    uniform = SoftmaxHead(4, 2, backend=backend, seed=0, kernel_init="uniform")
    assert uniform.kernel.min() >= 0.0
    assert uniform.kernel.max() < 1.0
    np.testing.assert_array_equal(uniform.bias, 0.0)
    np.testing.assert_array_equal(uniform.kernel, np.random.default_rng(0).random((4, 2)).astype(np.float32))

    glorot = SoftmaxHead(40, 20, backend=backend, seed=0)
    limit = np.sqrt(6.0 / 60)
    assert glorot.kernel.min() >= -limit
    assert glorot.kernel.max() <= limit
    assert glorot.kernel.min() < 0.0
    np.testing.assert_array_equal(glorot.bias, 0.0)


def test_rejects_bad_arguments(backend):
    head = make_head(backend, np.float32)
    hidden, labels = make_inputs(np.float32)
    with pytest.raises(ValueError, match=r"hidden must have shape \(\.\.\., 3\)"):
        head.forward(np.zeros((7, 4), dtype=np.float32), labels)
    with pytest.raises(TypeError, match="hidden must be a numpy.ndarray"):
        head.forward(hidden.tolist(), labels)
    with pytest.raises(TypeError, match="hidden must have dtype float32 or float64"):
        head.forward(hidden.astype(np.int32), labels)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        head.forward(hidden, labels.astype(np.float32))
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        head.forward(hidden, labels[:3])

    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got 5"):
        head.forward(hidden, np.full(7, 5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got -1"):
        head.forward(hidden, np.full(7, -1))

    with pytest.raises(TypeError, match="grad must have the model's dtype float32"):
        head.backward(hidden, labels, grad=np.zeros(head.params.shape, dtype=np.float64))
    with pytest.raises(ValueError, match="grad must have shape"):
        head.backward(hidden, labels, grad=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="d_hidden must not share memory with hidden"):
        head.backward(hidden, labels, d_hidden=hidden)
    with pytest.raises(ValueError, match="at least one row"):
        head.forward(np.zeros((0, HIDDEN), dtype=np.float32), np.zeros(0, dtype=np.int64))

    with pytest.raises(ValueError, match="kernel_init"):
        SoftmaxHead(HIDDEN, CLASSES, backend=backend, kernel_init="normal")
    with pytest.raises(ValueError, match="num_classes"):
        SoftmaxHead(HIDDEN, 0, backend=backend)
    with pytest.raises(ValueError, match="params must have shape"):
        head.params = np.zeros(4, dtype=np.float32)
