"""The embedded Ray a local curate stage runs on is always its own."""

from __future__ import annotations

from ps3.curation import ray_cluster


def test_embedded_ray_starts_its_own_even_when_another_is_announced(monkeypatch):
    """RAY_ADDRESS (or a `ray start` head on the machine) would make ray.init join that cluster
    and refuse the stage's CPU count; the stage must not depend on what else runs here."""
    import tempfile

    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there
    with tempfile.TemporaryDirectory(prefix="ray-") as temp_dir:  # short: Ray's socket paths have a limit
        with ray_cluster.embedded(1, 0, temp_dir):
            assert ray.cluster_resources().get("CPU") == 1
