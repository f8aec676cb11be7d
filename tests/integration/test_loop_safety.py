"""The closed loop's safety promises, with a real `balancerd run` process, real gloo ranks serving under
PlanController and real shared memory (see loop_harness.py):

* the daemon SIGKILLed while a migration is in flight: serving goes on, the migration completes on
  every rank at the same step, every output equals the dense reference; the restarted daemon
  re-attaches to the same control block and its plan versions keep growing;
* the runtime restarted: a plan made for the old generation is never applied (the leader does not
  announce it; announced, it would be refused for its generation), the daemon resets the job's window
  and plans for the new generation;
* a corrupted control block: invalid plans rejected on every rank with the right reason, reported by
  `balancerd status --json`; overwritten bytes dropped and counted; serving goes on, exact;
* plans still reach every rank with ``global_view=False`` (the announcement rides on the all-reduce);
* versions keep growing when both the state file and the control block are lost: the daemon numbers
  plans past every version the ranks report.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from loop_harness import Harness, RankArgs, World, wait_until

from balancerd.protocol import (
    ControlPlan,
    ControlReader,
    ControlWriter,
    PlanResult,
    Policy,
    RejectReason,
    StatusRecord,
    TelemetryReader,
    control_path,
    ring_path,
)
from balancerd.segment import _HEAD_OFFSET, _STARTED_OFFSET, HEADER_BYTES

pytestmark = pytest.mark.slow

JOB = "loop"
EXACT = 1e-5  # relative error of an EP output against the dense reference (float32)


def all_status(world: World, ok) -> list[StatusRecord] | None:
    """Every rank's status, when ``ok`` holds for each of them."""
    sts = world.statuses()
    return sts if all(s is not None and ok(s) for s in sts) else None


def applied(world: World, version: int) -> list[StatusRecord] | None:
    return all_status(world, lambda s: s.applied_version == version and s.result is PlanResult.APPLIED)


def served_steps(h: Harness, world: World, steps: int) -> None:
    """Wait until every rank reports ``steps`` more steps than the most advanced one does now."""
    start = max(s.step for s in world.statuses())
    wait_until(lambda: all_status(world, lambda s: s.step >= start + steps), h, f"{steps} more steps")


def check_exact_and_in_step(results: list[dict]) -> list[int]:
    """Every output equalled the reference and every rank served the same version at every step."""
    versions = results[0]["steps"]["version"]
    for r in results:
        assert max(r["steps"]["err"]) < EXACT, f"rank {r['rank']}: {max(r['steps']['err'])}"
        assert r["steps"]["version"] == versions, f"rank {r['rank']} switched at another step"
    assert versions == sorted(versions), "the placement version went backwards"
    return versions


def test_daemon_sigkilled_mid_migration_serving_continues_and_restart_reattaches(tmp_path):
    args = RankArgs(world=2, layers=6)
    with Harness(tmp_path) as h:
        run = h.runtime_dir("run")
        daemon = h.daemon(run)
        world = h.world(args, [run, run], gate=True)
        # The daemon's first plan is being migrated: the ranks say so in their status blocks.
        moving = wait_until(lambda: all_status(world, lambda s: s.result is PlanResult.IN_PROGRESS
                                               and s.pending_version > 0),
                            h, "a migration in flight in the status blocks")
        version = moving[0].pending_version
        assert {s.pending_version for s in moving} == {version}
        control = control_path(run, JOB)
        inode = control.stat().st_ino
        killed_at = time.time()
        daemon.kill(signal.SIGKILL)
        assert daemon.proc.returncode == -signal.SIGKILL
        world.open_gate()

        # Nothing to talk to: the migration still completes on every rank, and serving goes on.
        wait_until(lambda: applied(world, version), h, f"every rank to finish migrating to v{version}")
        served_steps(h, world, 4 * args.interval_steps)

        # Restarted, the daemon reads the truth from the status blocks and keeps the control block the
        # leader has mapped.
        daemon.start()
        job = wait_until(lambda: (j := daemon.job_state()) and j["window"]["intervals"] >= 1 and j, h,
                         "the restarted daemon to measure the job")
        assert job["leader"] and job["served_version"] >= version and job["last_version"] >= version
        assert f"control block reattached job={JOB} version=" in daemon.log()
        assert control.stat().st_ino == inode
        newer = daemon.request("plan", dry_run=False)["published_version"]
        assert newer > version
        wait_until(lambda: applied(world, newer), h, f"every rank to apply v{newer}")
        results = world.stop()

    versions = check_exact_and_in_step(results)
    assert version in versions and versions[-1] == newer
    for r in results:
        s = r["steps"]
        after_kill = [t for t, m in zip(s["t"], s["migrating"], strict=True) if m and t > killed_at]
        assert len(after_kill) >= 2, f"rank {r['rank']}: the migration did not span steps after the kill"
        done = [c[2] for c in r["changes"] if c[1] == "APPLIED"]
        assert version in done and done[-1] == newer and done == sorted(done), r["changes"]


def test_runtime_restart_refuses_the_stale_plan(tmp_path):
    args = RankArgs(world=2)
    L, E, S = args.layers, args.experts, args.world * args.slots_per_rank
    with Harness(tmp_path) as h:
        run = h.runtime_dir("run")
        daemon = h.daemon(run, mode="paused")
        first = h.world(args, [run, run], name="first")
        g1 = wait_until(first.generation, h, "the first runtime's generation")
        wait_until(lambda: (j := daemon.job_state()) and j["generation"] == f"{g1:x}"
                   and j["window"]["added"] >= 8, h, "the daemon to measure the first runtime")
        first.stop()

        # The daemon plans for generation g1 just after that runtime went away.
        stale = daemon.request("plan", dry_run=False)["published_version"]
        reader = ControlReader.open(control_path(run, JOB), L, E, S)
        try:
            stale_plan = reader.read()
        finally:
            reader.close()
        assert (stale_plan.version, stale_plan.generation) == (stale, g1)

        # The runtime restarts in the same directory: a new generation.
        second = h.world(args, [run, run], name="second")
        g2 = wait_until(lambda: (g := second.generation()) not in (None, g1) and g, h, "a new generation")
        job = wait_until(lambda: (j := daemon.job_state()) and j["generation"] == f"{g2:x}"
                         and j["window"]["intervals"] >= 2 and j, h, "the daemon to follow generation g2")
        history = {e["version"]: e for e in job["history"]}
        assert history[stale]["state"] == "superseded"
        last = job["window"]["last_interval"]
        assert last["source"] == "global_routed"
        # The window holds the new runtime's intervals only (it counts from step 0 again).
        assert job["window"]["added"] <= (last["last_step"] + 1) // args.interval_steps

        # An old-generation plan straight in the control block, with the highest version yet.
        forged = stale + 100
        initial = second.status(0).phys_to_log.copy()
        writer = ControlWriter.open(control_path(run, JOB))
        try:
            writer.publish(ControlPlan(forged, g1, np.roll(initial, 1, axis=1)))
        finally:
            writer.close()
        served_steps(h, second, 6 * args.interval_steps)
        refused = {(PlanResult.NONE, RejectReason.OK), (PlanResult.REJECTED, RejectReason.GENERATION)}
        sts = second.statuses()
        assert all(s.applied_version == 0 and (s.result, s.reason) in refused for s in sts), sts

        # Resumed, the daemon plans for the new generation and the new runtime applies it.
        daemon.request("resume")
        job = wait_until(lambda: (j := daemon.job_state())["last_plan"]["version"] > stale
                         and j["last_plan"]["state"] == "applied" and j, h, "a plan for the new generation")
        assert job["last_plan"]["generation"] == f"{g2:x}"
        fresh = job["last_plan"]["version"]
        results = second.stop()

    versions = check_exact_and_in_step(results)
    assert versions[-1] == fresh and stale not in versions and forged not in versions
    for r in results:
        assert r["generation"] == g2
        # Never announced, or, if announced, refused for its generation on every rank.
        answers = {(c[1], c[3]) for c in r["changes"] if c[2] in (stale, forged)}
        assert answers <= {("REJECTED", "GENERATION")}, r["changes"]


def _torn_write(path) -> None:
    """Overwrite the slot the next record goes to with garbage and advance the head past it, as a
    writer that died (or a stray process) in the middle of a record would leave the block."""
    record_bytes = (path.stat().st_size - HEADER_BYTES) // 2  # a block holds two records
    fd = os.open(path, os.O_RDWR)
    try:
        head = int(np.frombuffer(os.pread(fd, 8, _HEAD_OFFSET), "<u8")[0])
        garbage = np.random.default_rng(head).integers(0, 256, record_bytes, dtype=np.uint8).tobytes()
        os.pwrite(fd, garbage, HEADER_BYTES + (head % 2) * record_bytes)
        os.pwrite(fd, np.array([head + 1], "<u8").tobytes(), _STARTED_OFFSET)
        os.pwrite(fd, np.array([head + 1], "<u8").tobytes(), _HEAD_OFFSET)
    finally:
        os.close(fd)


def test_corrupted_control_block_rejected_reported_serving_continues(tmp_path):
    args = RankArgs(world=2)
    with Harness(tmp_path) as h:
        run = h.runtime_dir("run")
        daemon = h.daemon(run, mode="paused")  # it creates the control block and reports, never writes
        world = h.world(args, [run, run])
        gen = wait_until(world.generation, h, "the runtime's generation")
        path = control_path(run, JOB)
        wait_until(path.exists, h, "the daemon to create the control block")
        initial = world.status(0).phys_to_log.copy()

        missing = initial.copy()
        missing[1][missing[1] == 3] = 4                   # expert 3 loses every replica in layer 1
        out_of_range = initial.copy()
        out_of_range[2, 5] = args.experts + 7
        nan_bias = np.zeros((args.layers, args.experts), np.float32)
        nan_bias[0, 2] = np.nan
        bad = {
            1: (ControlPlan(1, gen, missing), RejectReason.MISSING_EXPERT),
            2: (ControlPlan(2, gen, out_of_range), RejectReason.ID_RANGE),
            3: (ControlPlan(3, gen, initial, Policy.TOKEN, selection_bias=nan_bias), RejectReason.VALUES),
        }
        writer = ControlWriter.open(path)
        try:
            for version, (plan, reason) in bad.items():
                writer.publish(plan)
                sts = wait_until(lambda v=version: all_status(world, lambda st: st.result_version == v
                                                              and st.result is not PlanResult.NONE),
                                 h, f"every rank to answer v{version}")
                assert all((s.result, s.reason, s.applied_version) == (PlanResult.REJECTED, reason, 0)
                           for s in sts), (version, sts)

                def reported(v=version):
                    ranks = daemon.job_state()["ranks"]
                    return all(r["status"] and r["status"]["result_version"] == v for r in ranks) and ranks

                ranks = wait_until(reported, h, f"the daemon to report the rejection of v{version}")
                assert [(r["status"]["result"], r["status"]["reason"]) for r in ranks] == \
                    [("rejected", reason.name.lower())] * args.world
            state = daemon.status_cli()  # `balancerd status --json`, as an operator runs it
            job = state["jobs"][JOB]
            assert job["served_version"] == 0
            assert {(r["status"]["result"], r["status"]["reason"], r["status"]["result_version"])
                    for r in job["ranks"]} == {("rejected", "values", 3)}

            # Garbage over the newest record: dropped and counted, nothing applied.
            _torn_write(path)
            served_steps(h, world, 4 * args.interval_steps)
            assert all_status(world, lambda s: s.applied_version == 0 and s.result_version == 3)

            # The block still works: a valid plan after all that is applied by every rank.
            writer.publish(ControlPlan(4, gen, np.roll(initial, 1, axis=1)))
        finally:
            writer.close()
        wait_until(lambda: applied(world, 4), h, "every rank to apply v4")
        served_steps(h, world, 2 * args.interval_steps)
        results = world.stop()

    versions = check_exact_and_in_step(results)
    assert set(versions) == {0, 4}
    assert results[0]["control_invalid"] >= 1  # the leader counted the torn record
    for r in results:
        rejected = [(c[2], c[3]) for c in r["changes"] if c[1] == "REJECTED"]
        assert rejected == [(v, reason.name) for v, (_, reason) in bad.items()], r["changes"]
        assert np.array_equal(r["host"], np.roll(initial, 1, axis=1))


def test_plans_reach_every_rank_without_the_global_view(tmp_path):
    """``global_view=False`` (no all-reduce of the counts) must not break the plan announcement, which
    rides on that all-reduce: before the fix only the leader saw it and waited alone in a broadcast."""
    args = RankArgs(world=2, global_view=False)
    with Harness(tmp_path) as h:
        run = h.runtime_dir("run")
        world = h.world(args, [run, run])
        gen = wait_until(world.generation, h, "the runtime's generation")
        initial = world.status(0).phys_to_log.copy()
        writer = ControlWriter.create(run, JOB, args.layers, args.experts, args.world * args.slots_per_rank,
                                      args.world, gen)
        try:
            writer.publish(ControlPlan(1, gen, np.roll(initial, 1, axis=1)))
            wait_until(lambda: applied(world, 1), h, "every rank to apply v1", timeout=20)
        finally:
            writer.close()
        results = world.stop()
    versions = check_exact_and_in_step(results)
    assert versions[-1] == 1
    reader = TelemetryReader.open(ring_path(run, JOB, 0))
    try:
        assert all(r.global_routed is None for r in reader.poll())  # still no global counts written
    finally:
        reader.close()


def test_versions_keep_growing_after_losing_state_file_and_control_block(tmp_path):
    args = RankArgs(world=2)
    with Harness(tmp_path) as h:
        run = h.runtime_dir("run")
        daemon = h.daemon(run)
        world = h.world(args, [run, run])
        wait_until(lambda: all_status(world, lambda s: s.applied_version >= 1), h, "the first plan applied")
        top = daemon.request("plan", dry_run=False)["published_version"]
        wait_until(lambda: applied(world, top), h, f"every rank to apply v{top}")
        daemon.kill()
        for f in daemon.state_dir.iterdir():  # the state file is lost ...
            f.unlink()
        control = control_path(run, JOB)
        with open(control, "r+b") as f:       # ... and the control block's header is damaged
            f.write(b"XXXXXXXX")
        daemon.start()
        wait_until(lambda: (j := daemon.job_state()) and j["window"]["intervals"] >= 1, h, "a window")
        newer = daemon.request("plan", dry_run=False)["published_version"]
        served_steps(h, world, 4 * args.interval_steps)
        job = daemon.job_state()
        sts = world.statuses()
        world.stop()
    assert "control block unusable" in daemon.log()
    assert newer > top, f"v{newer} published after v{top} was applied"
    assert job["last_plan"]["state"] != "applied" or all(s.applied_version == newer for s in sts), \
        f"the daemon reports v{newer} applied; the ranks serve {[s.applied_version for s in sts]}"
