"""The speed-target table of the benchmark report, on a made-up run."""

from fastlstm import bench


def _case(config, task, label, medians):
    return {"config": config, "task": task, "label": label, "failures": {},
            "results": {name: {"times": [seconds] * 3, "calls": 1} for name, seconds in medians.items()}}


def _run(cases):
    titles = {"fastlstm-c": "fastlstm C", "fastlstm-numba": "fastlstm Numba", "torch": "PyTorch nn.LSTM",
              "onnxruntime": "ONNX Runtime LSTM"}
    return {"titles": titles, "workers": {"2": {"cases": cases}}}


def test_targets_table_marks_met_and_missed():
    cases = [
        _case("ptb-small", "train", "L2-H200-B20-T20-train",
              {"fastlstm-c": 1.0, "fastlstm-numba": 2.0, "torch": 1.6}),
        _case("streaming", "step", "L2-H256-B1-step",
              {"fastlstm-c": 1.0, "fastlstm-numba": 1.0, "torch": 1.0, "onnxruntime": 3.0}),
    ]
    lines = bench._targets_section(_run(cases))
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines
            if line.startswith("| L2-")}
    # C is 1.6 times faster than PyTorch (needs 1.5); Numba 0.8 (needs 0.75).
    assert rows[("L2-H200-B20-T20-train", "PyTorch nn.LSTM")].endswith("| 1.5 | 1.60 | yes | 0.75 | 0.80 | yes |")
    # Equal to PyTorch is not faster than it.
    assert rows[("L2-H256-B1-step", "PyTorch nn.LSTM")].endswith("| 1 | 1.00 | no | 0.5 | 1.00 | yes |")
    assert rows[("L2-H256-B1-step", "ONNX Runtime LSTM")].endswith("| 1 | 3.00 | yes | 0.5 | 3.00 | yes |")


def test_targets_table_leaves_missing_peers_blank():
    cases = [_case("echo", "infer", "L3-H4-B5-T15-infer", {"fastlstm-c": 1.0})]
    lines = bench._targets_section(_run(cases))
    row = next(line for line in lines if line.startswith("| L3-"))
    assert row == "| L3-H4-B5-T15-infer | ONNX Runtime LSTM | 10 |  |  | 5 |  |  |"
