"""Two nodes simulated on one machine: 4 ranks in one gloo group, ranks 0-1 on "node A" (runtime dir A)
and ranks 2-3 on "node B" (runtime dir B), one real `balancerd run` per node.

The daemon beside rank 0 (A) is the leader: it plans and is the only one to write a control block.
The other (B) sees only ranks 2 and 3, yet observes the same global load through the all-reduced
counts in their rings. Every rank applies A's plan at the same step.
"""

from __future__ import annotations

import numpy as np
import pytest
from loop_harness import Harness, RankArgs, wait_until

from balancerd.protocol import PlanResult, TelemetryReader, control_path, ring_path

pytestmark = pytest.mark.slow

JOB = "loop"


def ring_records(directory, rank: int) -> dict[tuple[int, int], object]:
    """The records still in a rank's ring, by (first_step, last_step)."""
    reader = TelemetryReader.open(ring_path(directory, JOB, rank))
    try:
        return {(r.first_step, r.last_step): r for r in reader.poll()}
    finally:
        reader.close()


def test_leader_node_plans_other_node_observes_all_ranks_switch_together(tmp_path):
    args = RankArgs(world=4, layers=4, slots_per_rank=3)
    with Harness(tmp_path) as h:
        a, b = h.runtime_dir("node-a"), h.runtime_dir("node-b")
        daemon_a = h.daemon(a, name="daemon-a")
        daemon_b = h.daemon(b, name="daemon-b")
        world = h.world(args, [a, a, b, b])

        def applied():
            sts = world.statuses()
            ok = all(s is not None and s.result is PlanResult.APPLIED and s.applied_version >= 1 for s in sts)
            return ok and sts

        sts = wait_until(applied, h, "every rank to apply the leader's plan")
        version = sts[0].applied_version
        start = max(s.step for s in sts)
        wait_until(lambda: all(s.step >= start + 6 * args.interval_steps for s in world.statuses()), h,
                   "a few intervals served after the switch")
        results = world.stop()

        # Both daemons ingest everything the ranks published; then they hold the same window.
        steps = len(results[0]["steps"]["version"])
        last_step = steps // args.interval_steps * args.interval_steps - 1
        for d in (daemon_a, daemon_b):
            wait_until(lambda d=d: (d.job_state()["window"]["last_interval"] or {}).get("last_step")
                       == last_step, h, f"{d.name} to read the last interval")
        ja, jb = daemon_a.status_cli()["jobs"][JOB], daemon_b.status_cli()["jobs"][JOB]

    # A leads and wrote the only control block; B observes and never planned.
    assert ja["leader"] and not jb["leader"]
    assert ja["control"] == str(control_path(a, JOB)) and jb["control"] is None
    assert control_path(a, JOB).exists() and not control_path(b, JOB).exists()
    assert ja["last_plan"]["version"] == version and ja["last_plan"]["state"] == "applied"
    assert jb["last_plan"] is None and jb["history"] == [] and jb["last_version"] == 0
    assert [r["rank"] for r in ja["ranks"]] == [0, 1] and [r["rank"] for r in jb["ranks"]] == [2, 3]

    # The same global load, seen from both nodes.
    assert ja["generation"] == jb["generation"] and ja["world"] == jb["world"] == 4
    assert ja["served_version"] == jb["served_version"] == version
    for key in ("last_interval", "assignments", "intervals"):
        assert ja["window"][key] == jb["window"][key], key
    assert ja["window"]["last_interval"]["source"] == "global_routed"
    assert [x["max_min"] for x in ja["per_layer"]] == [x["max_min"] for x in jb["per_layer"]]
    assert [x["balancedness"] for x in ja["per_layer"]] == [x["balancedness"] for x in jb["per_layer"]]

    # Underneath: each ring's global counts are the sum of all four ranks' own counts.
    rings = [ring_records(d, r) for d, r in ((a, 0), (a, 1), (b, 2), (b, 3))]
    common = set.intersection(*(set(x) for x in rings))
    assert len(common) >= 4
    for key in common:
        total = sum(x[key].routed.astype(np.int64) for x in rings)
        for x in rings:
            assert np.array_equal(x[key].global_routed, total), key

    # Every rank served the same placement version at every step, and every output was exact.
    versions = results[0]["steps"]["version"]
    assert version in versions
    for r in results:
        assert r["steps"]["version"] == versions
        assert max(r["steps"]["err"]) < 1e-5
        assert [c[:3] for c in r["changes"] if c[1] == "APPLIED"] == \
            [c[:3] for c in results[0]["changes"] if c[1] == "APPLIED"]
