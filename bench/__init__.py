"""Benchmarks: our code against the peer tools on the same workload, in the same run."""
