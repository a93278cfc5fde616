"""Simulated devices that speak the real wire protocols, for tests, the demo and benchmarks."""
