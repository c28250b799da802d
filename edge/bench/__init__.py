"""Edge measurements: latency/throughput of bundles (``latency``), the machine's matmul peak
(``peak``) and OpenVINO per-node profiles (``opprofile``)."""
