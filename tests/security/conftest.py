import os

import pytest


@pytest.fixture
def redis_url():
    url = os.environ.get("LOCALVL_TEST_REDIS_URL")
    if not url:
        pytest.skip("no Redis server (set LOCALVL_TEST_REDIS_URL; .ci/run starts one)")
    return url  # tests use fresh random identities: nothing to clear
