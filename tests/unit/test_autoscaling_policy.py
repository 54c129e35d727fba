"""The Codec's autoscaling policy: Serve's queue-length rule over proxy and direct-port load together."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from progsae.server import autoscaling
from progsae.server.stats import Stats


def context(replicas: int, proxied: float, direct: dict[str, float], target: float = 2) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=None, deployment_name="Codec", app_name="progsae",  # pyright: ignore[reportArgumentType]
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=[],
        total_num_requests=proxied, total_queued_requests=0,
        aggregated_metrics={autoscaling.DIRECT_ONGOING: direct}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target))


@pytest.mark.parametrize(("replicas", "proxied", "direct", "wanted"), [
    (1, 0, {"r1": 12}, 6),           # fast-path load alone scales (Serve's own rule would say 0)
    (2, 4, {"r1": 3, "r2": 5}, 6),   # proxy and direct load add up
    (3, 6, {}, 3),                   # no direct port: Serve's default rule
    (2, 0, {"r1": 0, "r2": 0}, 0),   # idle: Serve's wrapper then applies min_replicas and the delays
])
def test_fast_path_policy(replicas, proxied, direct, wanted):
    got, state = autoscaling.fast_path_policy(context(replicas, proxied, direct))
    assert got == pytest.approx(wanted) and state == {}


def test_replica_reports_direct_calls_and_queued_work():
    s = Stats()
    s.enter("direct")
    s.enter("direct")
    s.enter("proxy")  # Serve counts these itself
    s.compute_started()
    assert autoscaling.replica_stats(s) == {"direct_ongoing": 2.0, "compute_pending": 1.0}
    s.leave("direct")
    s.compute_done()
    assert autoscaling.replica_stats(s) == {"direct_ongoing": 1.0, "compute_pending": 0.0}


def test_with_policy_keeps_a_named_one():
    assert autoscaling.with_policy({"max_replicas": 3})["policy"] == {"policy_function": autoscaling.POLICY}
    mine = {"policy": {"policy_function": "my.mod:fn"}}
    assert autoscaling.with_policy(mine)["policy"] == mine["policy"]
