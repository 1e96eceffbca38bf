"""Benchmarks: one client library shared by stress, scaling, overhead and worker-throughput runs."""
