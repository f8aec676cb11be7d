"""`make demo`'s promise, checked by running `balancerd demo --json` as a user does: a real daemon and
real gloo ranks close the loop, and the outputs stay equal to the dense reference.

The placement run uses the defaults (4 ranks, 160 steps). The token and drop runs use 2 ranks (8 slots
each) to keep the suite short on a small machine; they must complete exactly and report their plan
applied. Whether the drop policy actually drops is checked elsewhere.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from loop_harness import balancerd_cli

pytestmark = pytest.mark.slow


def demo(*options: str) -> dict:
    r = subprocess.run([*balancerd_cli(), "demo", "--json", *options], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout)


def test_demo_placement_fixes_the_imbalance_exactly():
    report = demo()
    assert report["options"]["policy"] == "placement" and report["ranks"] == 4
    assert report["imbalance_before"] > 3.0, report
    assert report["imbalance_after"] <= 1.3, report
    assert report["plans_applied"] >= 1 and report["migrated_bytes"] > 0, report
    assert report["reference_match"] is True and report["reference_checks"] > 0, report


@pytest.mark.parametrize("policy", ["token", "drop"])
def test_demo_other_policies_apply_their_plan_exactly(policy):
    report = demo("--policy", policy, "--ranks", "2", "--slots-per-rank", "8")
    assert report["options"]["policy"] == policy and report["ranks"] == 2
    assert report["plans_applied"] >= 1, report
    assert report["migrated_bytes"] == 0, report  # neither policy moves an expert
    assert report["reference_match"] is True and report["reference_checks"] > 0, report
