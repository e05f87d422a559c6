"""A Ray stage's pods name the Ray node's ports, and its job's NetworkPolicy admits them."""

from __future__ import annotations

from pathlib import Path

from ps3_platform.compile import compile_job, pytorchjobs_in
from ps3_platform.ports import RAY_PORTS, RAY_WORKER_PORTS
from ps3_platform.spec import load, load_pools

REPO = Path(__file__).resolve().parents[3]


def _containers(objects):
    for job in pytorchjobs_in(objects):
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            yield job["metadata"]["name"], replica["template"]["spec"]["containers"][0]


def test_curate_pods_name_the_ray_ports_and_others_do_not():
    objects = compile_job(load(REPO / "jobs" / "curate_quickstart.yaml").job, load_pools())
    seen = {}
    for name, container in _containers(objects):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        seen[name] = ports
        assert all(len(p) <= 15 for p in ports), "IANA service names are at most 15 characters"
    curate = next(p for n, p in seen.items() if n.endswith("curate"))
    assert {k: curate[k] for k in RAY_PORTS} == RAY_PORTS
    assert not any(k.startswith("ray-") for n, p in seen.items() if not n.endswith("curate") for k in p)


def test_network_policy_lists_ray_ports_only_for_jobs_with_a_ray_stage():
    pools = load_pools()
    policy = next(o for o in compile_job(load(REPO / "jobs" / "curate.yaml").job, pools)
                  if o["kind"] == "NetworkPolicy")
    ray_rule = policy["spec"]["ingress"][1]
    ports = {p["port"]: p.get("endPort") for p in ray_rule["ports"]}
    assert set(RAY_PORTS.values()) <= set(ports) and ports[RAY_WORKER_PORTS[0]] == RAY_WORKER_PORTS[1]
    assert ray_rule["from"] == policy["spec"]["ingress"][0]["from"]  # the job's own pods, nobody else
    plain = next(o for o in compile_job(load(REPO / "jobs" / "quickstart.yaml").job, pools)
                 if o["kind"] == "NetworkPolicy")
    assert len(plain["spec"]["ingress"]) == 1
