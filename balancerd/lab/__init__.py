"""The EP scaling lab: model shapes, a calibrated cost model, the parallelism advisor, the what-if
simulator, and the report side of `balancerd bench ep`. numpy only (matplotlib optional, for plots);
the torch program `bench ep` launches is moe_runtime/bench_ep.py."""
