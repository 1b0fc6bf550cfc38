"""Character-level language model, fastlstm against PyTorch: learning curves and throughput.

Both sides train the same model on the same data from the same initial weights for the same number
of windows: a 2-layer LSTM of 256 units over one-hot characters of the built-in corpus (the prose of
Python's reference documentation, ``fastlstm.tasks.text``), a dense softmax head, windows of 64
characters in 32 parallel streams (the state carried between windows), Adam (learning rate 0.002)
and clipping by global norm at 5. fastlstm reads the characters as ids (a row gather from the input
kernel); PyTorch's ``nn.LSTM`` receives the one-hot vectors, which is the same function. Validation
bits per character are measured on the whole validation split (32 streams) every ``--eval-every``
windows, without the timing of training.

The two trainers run in turns of ``--eval-every`` windows so that both see the same machine load.
Throughput is characters trained per second of training time (forward, backward and update, with
the data already in memory), excluding evaluation.

Weight conversion: fastlstm's kernel [I + H, 4H] has the gate columns i, j, f, o (TensorFlow's
BasicLSTMCell) and adds ``forget_bias`` (1.0) inside the forget sigmoid; PyTorch has W_ih [4H, I],
W_hh [4H, H] with rows i, f, g, o (g is fastlstm's j) and two biases. So W_ih and W_hh are the
transposed kernel blocks with the columns reordered, b_ih is fastlstm's bias reordered with
forget_bias added to the f block, and b_hh is zero.

Run ``python bench/charlm_vs_torch.py --windows 600 --markdown bench/charlm_result.md`` (needs
torch); ``--threads`` sets the threads of both sides (fastlstm's pool, through OMP_NUM_THREADS, and
PyTorch's intra-op threads).
"""

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=600, help="training windows on each side (default 600)")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="windows between validation measurements (default 100)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both sides (default: leave each library's default)")
    parser.add_argument("--backend", default="auto", help="fastlstm backend (default auto)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="call torch.set_flush_denormal(True) first: PyTorch's float operations on "
                             "denormal numbers then stop slowing it down. It sets the calling thread's "
                             "flags, which fastlstm's threads follow, so fastlstm flushes them too")
    parser.add_argument("--pipeline-chunks", type=int, default=0,
                        help="fastlstm: run the layers as a wavefront over this many chunks per window on "
                             "one thread per layer, with one BLAS thread each (default 0: off, one fused "
                             "call per window)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as a Markdown section to PATH")
    return parser.parse_args(argv)


def gate_permutation(hidden):
    """Column indices that turn fastlstm's gate blocks i, j, f, o into PyTorch's i, f, g, o."""
    import numpy as np

    blocks = [0, 2, 1, 3]   # PyTorch's i, f, g(j), o taken from fastlstm's block positions
    return np.concatenate([np.arange(b * hidden, (b + 1) * hidden) for b in blocks])


def to_torch(model, torch_lstm, torch_head):
    """Copy a ``fastlstm.charlm.CharLM``'s weights into ``nn.LSTM`` and ``nn.Linear``."""
    import numpy as np
    import torch

    lstm = model.lstm
    hidden = lstm.hidden_size
    order = gate_permutation(hidden)
    forget = slice(hidden, 2 * hidden)   # PyTorch's f block
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            kernel = lstm.kernel(layer).astype(np.float32)
            inputs = kernel.shape[0] - hidden
            bias = lstm.bias(layer)[order].astype(np.float32).copy()
            bias[forget] += lstm.forget_bias
            getattr(torch_lstm, f"weight_ih_l{layer}").copy_(torch.from_numpy(kernel[:inputs, order].T.copy()))
            getattr(torch_lstm, f"weight_hh_l{layer}").copy_(torch.from_numpy(kernel[inputs:, order].T.copy()))
            getattr(torch_lstm, f"bias_ih_l{layer}").copy_(torch.from_numpy(bias))
            getattr(torch_lstm, f"bias_hh_l{layer}").zero_()
        torch_head.weight.copy_(torch.from_numpy(model.head.kernel.T.copy()))
        torch_head.bias.copy_(torch.from_numpy(model.head.bias.copy()))


class TorchLM:
    """PyTorch's side: nn.LSTM over one-hot characters, nn.Linear head, Adam, clip_grad_norm_."""

    def __init__(self, model, lr, clip):
        import torch

        vocab = model.vocab_size
        self.torch = torch
        self.vocab = vocab
        self.lstm = torch.nn.LSTM(vocab, model.hidden_size, model.num_layers)
        self.head = torch.nn.Linear(model.hidden_size, vocab)
        to_torch(model, self.lstm, self.head)
        # nn.LSTM adds two biases, b_ih + b_hh, where fastlstm has one. Both would get the same
        # gradient, so Adam would move their sum twice as fast as fastlstm moves its bias: b_hh stays
        # at zero instead, and the two models train the same parameters.
        for layer in range(model.num_layers):
            getattr(self.lstm, f"bias_hh_l{layer}").requires_grad_(False)
        self.params = [p for p in self.lstm.parameters() if p.requires_grad] + list(self.head.parameters())
        # fastlstm's Adam is Keras': w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps).
        # PyTorch's divides by sqrt(v) / sqrt(1 - b2^t) + eps instead; with eps_t = eps / sqrt(1 - b2^t)
        # at step t the two updates are the same, so eps is set before every step.
        self.epsilon = 1e-7
        self.beta_2 = 0.999
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, self.beta_2), eps=self.epsilon)
        self.steps = 0
        self.clip = clip
        self.state = None

    def reset_state(self):
        self.state = None

    def _one_hot(self, ids):
        return self.torch.nn.functional.one_hot(self.torch.from_numpy(ids), self.vocab).float()

    def train_window(self, inputs, targets):
        torch = self.torch
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        outputs, self.state = self.lstm(self._one_hot(inputs), self.state)
        logits = self.head(outputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab),
                                                 torch.from_numpy(targets).reshape(-1))
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.steps += 1
        self.optimizer.param_groups[0]["eps"] = self.epsilon / (1.0 - self.beta_2 ** self.steps) ** 0.5
        self.optimizer.step()
        return float(loss.detach())

    def evaluate(self, rows, chunk=256):
        torch = self.torch
        total, count, state = 0.0, 0, None
        with torch.no_grad():
            for begin in range(0, rows.shape[1] - 1, chunk):
                end = min(begin + chunk, rows.shape[1] - 1)
                inputs = rows[:, begin:end].T.copy()
                targets = rows[:, begin + 1:end + 1].T.copy()
                outputs, state = self.lstm(self._one_hot(inputs), state)
                logits = self.head(outputs)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab),
                                                         torch.from_numpy(targets).reshape(-1), reduction="sum")
                total += float(loss)
                count += targets.size
        return total / count


def run(args):
    import numpy as np
    import torch

    import fastlstm
    from fastlstm import optim
    from fastlstm.charlm import BITS_PER_NAT, CharLM, CharLMTrainer
    from fastlstm.tasks import text

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("--flush-denormal: this CPU cannot flush denormal numbers")

    data = text.TextData.load("pydoc")
    train_rows = text.batchify(data.train, args.batch)
    valid_rows = text.batchify(data.valid, args.batch)
    windows_per_epoch = text.num_windows(train_rows, args.window)

    model = CharLM(len(data.vocab), args.hidden, args.layers, backend=args.backend, seed=args.seed)
    trainer = CharLMTrainer(model, optim.Adam(args.lr, clip_norm=args.clip), args.window,
                            pipeline_chunks=args.pipeline_chunks)
    peer = TorchLM(model, args.lr, args.clip)

    # The converted model computes the same function before training starts.
    initial = {"fastlstm": model.evaluate(valid_rows) * BITS_PER_NAT,
               "torch": peer.evaluate(valid_rows) * BITS_PER_NAT}
    if abs(initial["fastlstm"] - initial["torch"]) > 1e-3:
        raise SystemExit(f"weight conversion is wrong: initial validation bpc {initial}")

    curves = {"windows": [0], "fastlstm": [initial["fastlstm"]], "torch": [initial["torch"]]}
    seconds = {"fastlstm": 0.0, "torch": 0.0}
    train_bpc = {"fastlstm": [], "torch": []}
    done = 0
    while done < args.windows:
        turn = min(args.eval_every, args.windows - done)
        for name in ("fastlstm", "torch"):
            losses = []
            started = time.perf_counter()
            for k in range(done, done + turn):
                index = k % windows_per_epoch
                if index == 0:
                    (trainer.reset_state(args.batch) if name == "fastlstm" else peer.reset_state())
                inputs, targets = text.window_pair(train_rows, index, args.window)
                step = trainer.train_window if name == "fastlstm" else peer.train_window
                losses.append(step(inputs, targets))
            seconds[name] += time.perf_counter() - started
            train_bpc[name].append(float(np.mean(losses)) * BITS_PER_NAT)
        done += turn
        curves["windows"].append(done)
        curves["fastlstm"].append(model.evaluate(valid_rows) * BITS_PER_NAT)
        curves["torch"].append(peer.evaluate(valid_rows) * BITS_PER_NAT)
        print(f"windows {done:5d}: validation bpc fastlstm {curves['fastlstm'][-1]:.4f}, torch "
              f"{curves['torch'][-1]:.4f}; training time fastlstm {seconds['fastlstm']:.1f} s, "
              f"torch {seconds['torch']:.1f} s", flush=True)

    characters = args.windows * args.window * args.batch
    return {
        "command": "python bench/charlm_vs_torch.py " + " ".join(sys.argv[1:]),
        "settings": {name: getattr(args, name) for name in ("windows", "eval_every", "layers", "hidden",
                                                            "window", "batch", "lr", "clip", "seed", "threads",
                                                            "pipeline_chunks", "flush_denormal")},
        "corpus": {"characters": len(data.ids), "vocab": len(data.vocab), "train": len(data.train),
                   "valid": len(data.valid), "windows_per_epoch": windows_per_epoch},
        "versions": {"fastlstm": fastlstm.__version__, "backend": model.backend, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": _load_average()},
        "curves": curves,
        "train_bpc": train_bpc,
        "seconds": seconds,
        "characters_per_second": {name: characters / seconds[name] for name in seconds},
        "final_valid_bpc": {name: curves[name][-1] for name in ("fastlstm", "torch")},
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def markdown(result):
    """Return the results as a Markdown section."""
    s = result["settings"]
    speed = result["characters_per_second"]
    final = result["final_valid_bpc"]
    lines = [
        "## Character-level language model: fastlstm and PyTorch",
        "",
        f"Same model, data, initial weights and updates on both sides: {s['layers']} layers of {s['hidden']} "
        f"units over one-hot characters of the built-in corpus (Python's reference documentation, "
        f"{result['corpus']['characters']} characters, vocabulary {result['corpus']['vocab']}), a softmax "
        f"head, windows of {s['window']} characters in {s['batch']} streams, Adam at {s['lr']}, clipping at "
        f"global norm {s['clip']}, {s['windows']} windows "
        f"({s['windows'] / result['corpus']['windows_per_epoch']:.2f} epochs). Validation bits per character "
        f"are over the whole validation split.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, load average at the end "
        f"{result['machine']['load_average']}; fastlstm {result['versions']['fastlstm']} (backend "
        f"{result['versions']['backend']}), torch {result['versions']['torch']} "
        f"({result['machine']['torch_threads']} threads), numpy {result['versions']['numpy']}, Python "
        f"{result['versions']['python']}. fastlstm ran "
        + (f"its layers as a wavefront over {s['pipeline_chunks']} chunks per window, one thread per layer "
           f"with one BLAS thread each." if s["pipeline_chunks"] else "one fused call per window.")
        + (" Both sides flushed denormal numbers to zero (`torch.set_flush_denormal(True)` on the "
           "calling thread, whose flags fastlstm's threads follow)."
           if s.get("flush_denormal") else ""),
        "",
        "| windows | fastlstm valid bpc | PyTorch valid bpc | difference |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for windows, ours, theirs in zip(result["curves"]["windows"], result["curves"]["fastlstm"],
                                     result["curves"]["torch"]):
        lines.append(f"| {windows} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")
    lines += [
        "",
        "| | fastlstm | PyTorch | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| final validation bpc | {final['fastlstm']:.4f} | {final['torch']:.4f} | "
        f"{final['fastlstm'] - final['torch']:+.4f} (difference) |",
        f"| training time, s | {result['seconds']['fastlstm']:.1f} | {result['seconds']['torch']:.1f} | "
        f"{result['seconds']['torch'] / result['seconds']['fastlstm']:.2f} |",
        f"| characters per second | {speed['fastlstm']:.0f} | {speed['torch']:.0f} | "
        f"{speed['fastlstm'] / speed['torch']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        # Before numpy, scipy or torch load their BLAS and OpenMP runtimes, which read these once.
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(args.threads)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
