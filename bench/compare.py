"""Compare fastlstm with the other LSTM implementations and write BENCHMARKS.md and docs/benchmarks.png.

Usage, from the repository root after ``pip install -e ".[test,bench]"`` and a passing test suite:

    python bench/compare.py [--quick] [--configs echo,ptb-small] [--threads 1,all] [--output PATH]

The machinery is ``fastlstm.bench`` (also behind ``fastlstm bench``). This script adds the numpy
reference of ``tests/reference.py`` as one more implementation and writes the report and the chart
into the repository unless ``--output`` or ``--chart`` name other paths. A default run takes about
15-20 minutes on 2 cores; ``--quick`` takes a few.

The report written to the repository ends with two written sections: ``bench/analysis.md``, where
the time goes in the cases that miss their targets (profiles measured with the commands it names),
and ``bench/charlm_result.md``, the language-model comparison that ``bench/charlm_vs_torch.py``
measures (too long to repeat here). Both name their own commands.
"""

import os
import shlex
import sys

from fastlstm.bench import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written sections appended to the generated report, in this order.
SECTIONS = ("analysis.md", "charlm_result.md")


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

    if status == 0 and report is not None:
        for name in SECTIONS:
            path = os.path.join(ROOT, "bench", name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as section, open(report, "a", encoding="utf-8") as output:
                    output.write("\n" + section.read())
    return status


if __name__ == "__main__":
    sys.exit(main())
