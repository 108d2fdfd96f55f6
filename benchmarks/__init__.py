"""Throughput benchmarks of gunn_jax components."""
