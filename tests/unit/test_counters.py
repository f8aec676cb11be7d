"""moe_runtime.counters: the flat layout, recording flag, CPU timers and the CUDA timers' stream cache."""

from __future__ import annotations

import time

import torch

from moe_runtime.counters import Counters


def test_views_share_two_flat_buffers_and_reset_zeroes_them() -> None:
    c = Counters(3, 5, 4, spare_words=2)
    c.routed[1, 2] = 7
    c.received[2, 3] = 9
    c.bias_changed[0] = 4
    assert c.routed_and_spare().numel() == 3 * 5 + 2
    assert int(c.routed_and_spare()[1 * 5 + 2]) == 7
    host = c.host_buffers()
    c.snapshot_into(host, non_blocking=False)
    c.reset()
    assert int(host.routed[1, 2]) == 7 and int(host.received[2, 3]) == 9 and int(host.bias_changed[0]) == 4
    assert not c.routed.any() and not c.received.any() and not c.bias_changed.any()


def test_cpu_timers_sample_only_timed_steps() -> None:
    c = Counters(2, 4, 2)
    c.set_timing(False)
    with c.timed("expert", 1):
        pass
    assert all((t == 0).all() for t in c.drain_timings().values())
    c.set_timing(True)
    with c.timed("expert", 1):
        sum(range(1000))
    means = c.drain_timings(mean=True)
    assert means["expert"][1] > 0 and means["expert"][0] == 0 and not means["dispatch"].any()


def test_a_timed_span_of_layers_shares_its_time_evenly() -> None:
    c = Counters(4, 4, 2)
    with c.timed("expert", slice(None)):
        time.sleep(0.004)
    with c.timed("expert", slice(2, 4)):
        time.sleep(0.002)
    us = c.drain_timings()["expert"]
    assert us[0] == us[1] >= 1000 and us[2] == us[3] >= us[0] + 1000
    assert us.sum() >= 4000 + 2000


def test_the_current_stream_object_is_built_only_when_the_current_stream_changes(monkeypatch) -> None:
    """torch.cuda.current_stream() builds a torch.cuda.Stream each call (12-30 us of host time on the
    H200 machines): the forward path's records and waits reuse one until the current stream's ids
    change; the timers go through the same cache."""
    from moe_runtime import streams

    current = [(11, 0, 1)]
    built = []

    def current_stream(index):
        built.append((index, current[0]))
        return ("stream", current[0])

    monkeypatch.setattr(torch._C, "_cuda_getCurrentStream", lambda index: current[0], raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(streams, "_BUILT", {})
    c = Counters(1, 2, 2)
    c.device = torch.device("cuda", 0)
    assert c.current_stream() == ("stream", (11, 0, 1))
    assert streams.current_stream(torch.device("cuda", 0)) == ("stream", (11, 0, 1))
    assert built == [(0, (11, 0, 1))]
    current[0] = (12, 0, 1)  # the engine switched streams
    assert c.current_stream() == ("stream", (12, 0, 1))
    assert streams.current_stream(torch.device("cuda", 1)) == ("stream", (12, 0, 1))  # another device
    assert built == [(0, (11, 0, 1)), (0, (12, 0, 1)), (1, (12, 0, 1))]
