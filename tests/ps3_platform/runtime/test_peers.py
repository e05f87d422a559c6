"""Peer liveness: a dead rank on this host is seen at once, one elsewhere once its beat stops."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from ps3_platform.ports import free_port
from ps3_platform.runtime.peers import Peers

#: Issue 20: a rank that waits on its peers' shards learns at once when one has died.
pytestmark = pytest.mark.faults


def _store() -> dist.Store:
    return dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=5))


def test_a_dead_process_on_this_host_is_gone_at_once():
    store = _store()
    me = Peers(store, 0).start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.set("1", f"{me._host} {child.pid} 1")
    assert me.gone([0, 1, 2]) == []  # itself, a live peer, a peer not started yet
    child.kill()
    child.wait()
    assert me.gone([1]) == [1]


def test_a_peer_on_another_host_is_gone_when_its_beat_stops():
    store = _store()
    me = Peers(store, 0, stale_s=0.3)
    store.set("1", "elsewhere 4242 7")
    assert me.gone([1]) == []
    time.sleep(0.4)
    store.set("1", "elsewhere 4242 8")  # beating: alive
    assert me.gone([1]) == []
    time.sleep(0.4)
    assert me.gone([1]) == [1]
