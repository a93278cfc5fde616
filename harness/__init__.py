"""Real servers started on loopback for tests, the demo and benchmarks.

carbon-cache, graphite-web, Mosquitto and carbon-c-relay.
"""
