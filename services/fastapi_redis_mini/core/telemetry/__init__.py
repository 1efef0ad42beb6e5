"""Metrics, traces and logs, configured the same way for the api and the worker."""
