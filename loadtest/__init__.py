"""Load for the service: the Locust users (`locustfile.py`) and the benchmark (`bench/`)."""
