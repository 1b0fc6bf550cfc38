import os

import numpy as np
import pytest

import fastlstm

AVAILABLE_BACKENDS = [name for name, info in fastlstm.backends().items() if info["available"]]

# Relative tolerances per dtype, used by every comparison against the float64 numpy reference.
# float32 carries about 6e-8 relative rounding per operation; over tens of steps and sums of a few
# hundred terms the error stays below 1e-5. float64 keeps 1e-12 with the same margin.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}


@pytest.fixture(params=["c", "numba"])
def backend(request):
    """Each backend in turn; a backend that cannot load is skipped, never silently replaced."""
    info = fastlstm.backends()[request.param]
    if not info["available"]:
        if os.environ.get("FASTLSTM_REQUIRE_BACKENDS"):
            pytest.fail(f"backend {request.param} is required but not available: {info['reason']}")
        pytest.skip(f"backend {request.param} not available: {info['reason']}")
    return request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn a skipped TensorFlow comparison into a failure when FASTLSTM_REQUIRE_TENSORFLOW is set.

    CI installs TensorFlow, so a skip there means the comparison silently stopped running.
    """
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("FASTLSTM_REQUIRE_TENSORFLOW")
            and item.get_closest_marker("tensorflow") is not None):
        report.outcome = "failed"
        report.longrepr = f"TensorFlow comparison skipped although FASTLSTM_REQUIRE_TENSORFLOW is set: {report.longrepr}"
