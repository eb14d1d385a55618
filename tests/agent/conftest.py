"""Fixtures the agent's process-level tests share: a fresh pair of nodes, and a real
`opnsense-ha serve` process on its backup that the primary points at (stopped cleanly after)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.agents import start_agent, stop
from support.nodes import Pair, make_pair


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


@pytest.fixture
def agent(pair: Pair) -> Iterator[str]:
    proc, url = start_agent(pair.backup, "--tls-cert", str(pair.cert_file), "--tls-key", str(pair.key_file),
                            "--services-dir", str(pair.services_dir), "--state-dir", str(pair.state_dir))
    pair.point_primary_at(url.removesuffix("xmlrpc.php"))
    try:
        yield url
    finally:
        assert stop(proc) == 0
