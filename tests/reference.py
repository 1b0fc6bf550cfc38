"""Plain numpy LSTM: the executable specification that every backend is tested against.

It is written to be obviously correct, not fast. Shapes are time-major: x is [T, B, I], the packed
state is [L, 2, B, H] (index 0 = c, 1 = h), and parameters are the flat vector of ``fastlstm._layout``.
The cell is TensorFlow's BasicLSTMCell with gate blocks i, j, f, o and ``forget_bias`` added inside
the forget sigmoid.
"""

import numpy as np

from fastlstm._layout import layer_offsets


def sigmoid(z):
    # 0.5 * tanh(z / 2) + 0.5 equals 1 / (1 + exp(-z)) and cannot overflow for large |z|.
    return 0.5 * np.tanh(0.5 * z) + 0.5


def unpack(params, input_size, hidden_size, num_layers):
    """Return a list of (kernel [I_l + H, G], bias [G]) views, one pair per layer."""
    gates = 4 * hidden_size
    layers = []
    for kernel_start, bias_start, end in layer_offsets(input_size, hidden_size, num_layers):
        kernel = params[kernel_start:bias_start].reshape(-1, gates)
        layers.append((kernel, params[bias_start:end]))
    return layers


def forward(params, x, state, forget_bias=1.0):
    """Run the stacked LSTM over x [T, B, I] from state [L, 2, B, H].

    Returns (y [T, B, H], final_state [L, 2, B, H], tape). The input state is not modified.
    """
    num_layers, _, _, hidden = state.shape
    steps = x.shape[0]
    layers = unpack(params, x.shape[2], hidden, num_layers)
    final = np.empty_like(state)
    tape = []
    inputs = x
    for layer, (kernel, bias) in enumerate(layers):
        c = state[layer, 0].copy()
        h = state[layer, 1].copy()
        cs, hs, acts = [c], [h], []
        for t in range(steps):
            z = np.concatenate([inputs[t], h], axis=1) @ kernel + bias
            zi, zj, zf, zo = np.split(z, 4, axis=1)
            i, j, f, o = sigmoid(zi), np.tanh(zj), sigmoid(zf + forget_bias), sigmoid(zo)
            c = c * f + i * j
            h = np.tanh(c) * o
            cs.append(c)
            hs.append(h)
            acts.append((i, j, f, o))
        final[layer, 0] = c
        final[layer, 1] = h
        tape.append((inputs, cs, hs, acts))
        inputs = np.stack(hs[1:])
    return inputs, final, tape


def backward(params, tape, d_y, d_final_state=None):
    """Back-propagate d_y [T, B, H] (and optionally d_final_state [L, 2, B, H]) through ``tape``.

    Returns (d_params, d_initial_state [L, 2, B, H], d_x [T, B, I]).
    """
    num_layers = len(tape)
    x = tape[0][0]
    hidden = d_y.shape[2]
    d_params = np.zeros_like(params)
    d_layers = unpack(d_params, x.shape[2], hidden, num_layers)
    layers = unpack(params, x.shape[2], hidden, num_layers)
    d_state = np.zeros((num_layers, 2) + d_y.shape[1:], dtype=d_y.dtype)
    d_out = d_y
    for layer in reversed(range(num_layers)):
        inputs, cs, hs, acts = tape[layer]
        kernel, _ = layers[layer]
        d_kernel, d_bias = d_layers[layer]
        in_size = inputs.shape[2]
        if d_final_state is None:
            dc = np.zeros_like(cs[0])
            dh_next = np.zeros_like(hs[0])
        else:
            dc = d_final_state[layer, 0].copy()
            dh_next = d_final_state[layer, 1].copy()
        d_inputs = np.zeros_like(inputs)
        for t in reversed(range(len(acts))):
            i, j, f, o = acts[t]
            dh = d_out[t] + dh_next
            tanh_c = np.tanh(cs[t + 1])
            # h = tanh(c) * o, c = c_prev * f + i * j
            do = dh * tanh_c
            dc = dc + dh * o * (1.0 - tanh_c**2)
            di, dj, df = dc * j, dc * i, dc * cs[t]
            dz = np.concatenate(
                [di * i * (1 - i), dj * (1 - j**2), df * f * (1 - f), do * o * (1 - o)], axis=1
            )
            dc = dc * f
            xh = np.concatenate([inputs[t], hs[t]], axis=1)
            d_kernel += xh.T @ dz
            d_bias += dz.sum(axis=0)
            d_xh = dz @ kernel.T
            d_inputs[t] = d_xh[:, :in_size]
            dh_next = d_xh[:, in_size:]
        d_state[layer, 0] = dc
        d_state[layer, 1] = dh_next
        d_out = d_inputs
    return d_params, d_state, d_out
