"""balancerd: the expert-load balancing sidecar (numpy only; never imports torch)."""
