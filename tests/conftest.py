import os
import sys

# Triton kernels run on CPU tensors only if the interpreter is on before they are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("fuzz", deadline=None, print_blob=True)  # `make fuzz`: new examples each run
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def python_bodies():
    """The quarot_fx ops' Python bodies run every call (not the C++ kernels of native_ops): for
    tests that watch or swap the C functions those bodies call."""
    from quarot_fx.kernels import native_ops

    with native_ops.suspended():
        yield
