"""Test distribution for `make test` (pytest-xdist, ``-n 2 --dist loadgroup``).

Most of the suite's time goes to multi-process runs on gloo, whose ranks wait on each other and
on start-up (imports) for a good part of it; two test files at a time fill those waits on CI's two
cores. Each file's tests stay together on one worker (``xdist_group``: module fixtures are built
once), and the files that use the session fixture ``earlybert_tp2_run`` (a 4-rank run,
tests/distributed/conftest.py) form one group, so it is built once. Without xdist (a plain
``pytest``) the markers do nothing.
"""

import pytest

SHARED = "earlybert_tp2_run"


def pytest_collection_modifyitems(config, items):
    sharing = {item.path for item in items if SHARED in getattr(item, "fixturenames", ())}
    for item in items:
        group = SHARED if item.path in sharing else f"{item.path.parent.name}/{item.path.name}"
        item.add_marker(pytest.mark.xdist_group(group))
