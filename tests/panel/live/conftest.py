"""Fixtures of the websocket tests (tests/panel/live/).

Each section belongs to the tests named in its heading; add yours in a section
of its own.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]

# =====================================================================================
# Live status and process lists (test_live_*.py, test_bridge.py): the channel
# layer each test runs on, twice: in memory and channels-redis on a private
# redis (scripts/redis.sh; `make test` starts it and passes VPANEL_TEST_REDIS_URL).
# =====================================================================================


def _redis_unavailable(why: str) -> None:
    message = (f"the channels-redis cases need a private redis-server, and {why}; "
               "scripts/redis.sh starts one (scripts/bootstrap.sh installs redis-server)")
    if os.geteuid() != 0:
        pytest.skip(message + " [not root: skipped]")
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The private redis's URL, started here when `make test` did not."""
    url = os.environ.get("VPANEL_TEST_REDIS_URL", "").strip()
    if not url:
        res = subprocess.run([str(REPO / "scripts" / "redis.sh"), "start"], capture_output=True,
                             text=True, timeout=30, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            _redis_unavailable(f"scripts/redis.sh start failed: {res.stderr.strip()[-500:]}")
        url = res.stdout.strip()
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except Exception as e:  # any failure to reach it is the same failure here
        _redis_unavailable(f"{url} does not answer ({e})")
    return url


LAYERS = ("memory", "redis")


@pytest.fixture(params=LAYERS)
def channel_layer(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """CHANNEL_LAYERS for this test: in memory, then channels-redis (a prefix of its own,
    so that test workers sharing the redis never hear each other's groups)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        settings.CHANNEL_LAYERS = {"default": {
            "BACKEND": "panel.layers.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": url, "max_connections": 1000}],
                       "prefix": f"vpt-{uuid.uuid4().hex[:12]}"}}}
    else:
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    from channels.layers import get_channel_layer

    wanted = "RedisChannelLayer" if request.param == "redis" else "InMemoryChannelLayer"
    assert type(get_channel_layer()).__name__ == wanted  # the settings change took
    yield request.param


@pytest.fixture
def watcher() -> Iterator[Any]:
    """The process's ProcessWatcher, clean before and after (each test has its own loop)."""
    from panel.guests.processes import WATCHER

    WATCHER.reset()
    yield WATCHER
    WATCHER.reset()


@pytest.fixture
def short_socket_dir() -> Iterator[Path]:
    """A directory for Unix sockets: pytest's tmp_path may pass the 108-byte limit."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vpl-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)

# ========================== end of the live status section ==========================
