"""Compare fastlstm with the other LSTM implementations and write BENCHMARKS.md and docs/benchmarks.png.

Usage, from the repository root after ``pip install -e ".[test,bench]"`` and a passing test suite:

    python bench/compare.py [--quick] [--configs echo,ptb-small] [--threads 1,all] [--output PATH]

The machinery is ``fastlstm.bench`` (also behind ``fastlstm bench``). This script adds the numpy
reference of ``tests/reference.py`` as one more implementation and writes the report and the chart
into the repository unless ``--output`` or ``--chart`` name other paths. A default run takes about
15-20 minutes on 2 cores; ``--quick`` takes a few.

The report written to the repository ends with ``bench/charlm_result.md``, the language-model
comparison that ``bench/charlm_vs_torch.py`` measures (a run of an hour is too long to repeat here);
that section names its own commands.
"""

import os
import shlex
import sys

from fastlstm.bench import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "bench/compare.py"] + argv)
    extra = ["--peer-module", os.path.join(ROOT, "bench", "peers.py"), "--command", command]
    report = None
    if not any(arg == "--output" or arg.startswith("--output=") for arg in argv):
        report = os.path.join(ROOT, "BENCHMARKS.md")
        extra += ["--output", report]
    if not any(arg == "--chart" or arg.startswith("--chart=") for arg in argv):
        extra += ["--chart", os.path.join(ROOT, "docs", "benchmarks.png")]
    status = run_bench(argv + extra)

    charlm_section = os.path.join(ROOT, "bench", "charlm_result.md")
    if status == 0 and report is not None and os.path.exists(charlm_section):
        with open(charlm_section, encoding="utf-8") as section, \
                open(report, "a", encoding="utf-8") as output:
            output.write("\n" + section.read())
    return status


if __name__ == "__main__":
    sys.exit(main())
