import os
import tempfile
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# the C++ kernels build once (about 12 s) into a cache shared by test runs, outside the user's home
os.environ.setdefault("QUANTCHAT_KERNELS_DIR", str(Path(tempfile.gettempdir()) / "quantchat-test-kernels"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module", autouse=True)
def _module_home(tmp_path_factory):
    """The same QUANTCHAT_HOME already for module-scoped fixtures (models built or converted once per module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTCHAT_HOME", str(tmp_path_factory.getbasetemp() / "qc_home"))
        yield


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Tests never touch the user's quantchat home, except the shared converted default model."""
    monkeypatch.setenv("QUANTCHAT_HOME", str(tmp_path_factory.getbasetemp() / "qc_home"))
    monkeypatch.delenv("QUANTCHAT_PROGRESS", raising=False)  # progress output as without a terminal


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A QUANTCHAT_HOME of this test's own (nothing converted or built in it yet)."""
    h = tmp_path / "home"
    monkeypatch.setenv("QUANTCHAT_HOME", str(h))
    return h


@pytest.fixture
def one_thread():
    """torch on one thread for the test (many small ops: no OpenMP spin contention on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
