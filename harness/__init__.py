"""Real servers (carbon-cache, graphite-web, Mosquitto) started on loopback for tests, the demo and benchmarks."""
