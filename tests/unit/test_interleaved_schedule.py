"""EPMoEStack's interleaved schedule: the order in which it issues each range's layer steps.

Outputs are checked against the dense reference with real gloo groups in
tests/integration/test_ep_equivalence.py; a schedule that issued the steps in another valid order
would pass there and still lose the overlap (or, with copy engines, queue a transfer behind experts
it does not need). Here stand-in layers record the calls, so the order itself is pinned down.
"""

from __future__ import annotations

import pytest
import torch

from moe_runtime.layer import EPMoEStack

HIDDEN = 4


class RecordingLayer:
    """Takes the steps EPMoEStack calls and logs (step, layer, range)."""

    def __init__(self, index: int, log: list[tuple[str, int, int]]):
        self.index, self.log = index, log
        self.counters = None

    def _note(self, step: str, lane: int) -> int:
        self.log.append((step, self.index, lane))
        return lane

    def begin(self, x: torch.Tensor, lane: int, lanes: int) -> int:
        return self._note("begin", lane)

    def send_rows(self, started: int):
        return _Sent(self._note("send", started))

    def start_experts(self, sent) -> int:
        return self._note("start", sent.lane)

    def finish_experts(self, half: int) -> int:
        return self._note("finish", half)

    def return_results(self, y: int, sent) -> int:
        assert y == sent.lane
        return self._note("return", sent.lane)

    def end(self, normed: torch.Tensor, back: int, sent) -> torch.Tensor:
        self._note("end", back)
        return torch.zeros_like(normed)

    def account(self, changed, dropped) -> None:
        pass


class _Sent:
    def __init__(self, lane: int):
        self.lane, self.changed, self.dropped = lane, torch.zeros(()), None


def schedule(ranges: int, layers: int) -> list[tuple[str, int, int]]:
    log: list[tuple[str, int, int]] = []
    stack = EPMoEStack.__new__(EPMoEStack)
    object.__setattr__(stack, "layers", [RecordingLayer(i, log) for i in range(layers)])
    x = torch.randn(4 * ranges, HIDDEN)
    out = EPMoEStack._run_interleaved(stack, x, [slice(4 * i, 4 * i + 4) for i in range(ranges)])
    torch.testing.assert_close(out, x)  # the stand-in layers add nothing
    return log


def test_two_ranges_take_turns_with_the_next_ranges_routing_between_the_halves() -> None:
    turn = []
    for layer in range(2):
        for lane, other in ((0, 1), (1, 0)):
            nxt = layer + (lane == 1)  # after range 1's turn comes range 0 of the next layer
            between = [("end", nxt - 1, other)] if nxt > 0 else []
            between += [("begin", nxt, other)] if nxt < 2 else []
            sends = [("send", nxt, other)] if nxt < 2 else []
            turn += [("start", layer, lane), *between, ("finish", layer, lane), *sends,
                     ("return", layer, lane)]
    assert schedule(2, 2) == [("begin", 0, 0), ("send", 0, 0), *turn, ("end", 1, 1)]


@pytest.mark.parametrize("ranges, layers", [(2, 1), (2, 3), (3, 2), (4, 3)])
def test_every_range_takes_its_steps_in_order_and_transfers_follow_their_inputs(ranges: int,
                                                                                layers: int) -> None:
    log = schedule(ranges, layers)
    for lane in range(ranges):
        own = [(step, layer) for step, layer, r in log if r == lane]
        steps = ("begin", "send", "start", "finish", "return", "end")
        assert own == [(step, layer) for layer in range(layers) for step in steps]
    # The host waits for a range's counts (send) only after the turn before it has issued its second
    # half, and a turn's results leave after the next range's rows: transfers in input order.
    for at, (step, _, _) in enumerate(log):
        if step == "start":
            assert log[at - 1][0] in ("send", "return")
        if step == "send" and at > 1:
            assert log[at - 1][0] == "finish"
            assert log[at + 1][0] == "return"
