"""Real servers (carbon-cache, graphite-web, Mosquitto, carbon-c-relay) started on loopback for tests, the demo and benchmarks."""
