"""The install without the C extension: skipped on request, or after a failed compilation."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent

# Prints what the installed copy reports; run from a folder outside the repository so that the
# source tree does not shadow the installed package. An editable install of the repository (as in
# CI) adds an import hook that would still find the repository's own extension, so the probe drops
# that hook first.
PROBE = """
import sys
sys.meta_path = [finder for finder in sys.meta_path
                 if not str(getattr(finder, "__module__", "")).startswith("__editable__")]
import json, numpy as np, fastlstm
model = fastlstm.LSTM(1, 4, 2, seed=0)
y = model.forward(np.ones((2, 3, 1), dtype=np.float32), model.zero_state(2))
print(json.dumps({"file": fastlstm.__file__, "backend": model.backend,
                  "backends": fastlstm.backends(), "finite": bool(np.isfinite(y).all())}))
"""


def install_and_probe(tmp_path, extra_env):
    target = tmp_path / "site"
    env = {**os.environ, **extra_env}
    env.pop("FASTLSTM_BACKEND", None)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--verbose", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--target", str(target), str(REPOSITORY)],
        env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600,
                           env={**env, "PYTHONPATH": str(target)})
    assert probe.returncode == 0, probe.stderr
    return install, json.loads(probe.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra_env, message", [
    ({"FASTLSTM_NO_EXTENSION": "1"}, "FASTLSTM_NO_EXTENSION is set: skipping the C extension"),
    ({"CC": "false"}, "WARNING: the fastlstm C extension could not be built"),
], ids=["skipped", "compiler-fails"])
def test_install_without_extension_runs_on_numba(tmp_path, extra_env, message):
    install, report = install_and_probe(tmp_path, extra_env)
    assert message in install.stdout + install.stderr
    assert report["file"].startswith(str(tmp_path))
    assert report["backend"] == "numba"
    assert report["backends"]["c"]["available"] is False
    assert "_cext" in report["backends"]["c"]["reason"]
    assert report["backends"]["numba"]["available"] is True
    assert report["finite"]
    assert not list((tmp_path / "site" / "fastlstm").glob("_cext*.so"))
