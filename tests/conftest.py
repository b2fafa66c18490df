import os
from pathlib import Path

import pytest

# Tests never reach the Hub; the tiny model and demo subject are built into a per-session cache.
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread in this process and every subprocess a test starts (set before torch is imported):
# the tiny model gains nothing from two, a busy machine makes OpenMP spin-waits very slow, and
# runs compared bit for bit across processes then share one reduction order.
os.environ["OMP_NUM_THREADS"] = "1"

DREAMBOOTH_ROOT = Path(__file__).resolve().parents[2] / "shared" / "dreambooth"


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sparse-db-cache")
    previous = os.environ.get("SPARSE_DB_CACHE")
    os.environ["SPARSE_DB_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("SPARSE_DB_CACHE", None)
    else:
        os.environ["SPARSE_DB_CACHE"] = previous
