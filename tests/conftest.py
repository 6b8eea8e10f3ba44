import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """One fresh snnc cache per test file (opt in with ``pytestmark = pytest.mark.usefixtures(...)``):
    builds shared between its tests hit it, nothing leaks into the user's cache or other files."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SNNC_CACHE_DIR", str(tmp_path_factory.mktemp("snnc_cache")))
    yield
    mp.undo()


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids thread-pool sync costs on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
