import pytest

import fastlstm


@pytest.fixture(params=["c", "numba"])
def backend(request):
    """Each available backend in turn; a missing one is skipped with its reason."""
    info = fastlstm.backends()[request.param]
    if not info["available"]:
        pytest.skip(f"backend {request.param} not available: {info['reason']}")
    return request.param
