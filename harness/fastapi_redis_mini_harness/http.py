"""One TLS context for every HTTP client the harness and the tests make.

httpx builds a TLS context for each client it creates, loading the CA bundle: about 36 ms of
CPU, even for a plain-HTTP URL. The harness waited for a service by making a client for every
poll, ten a second, and so spent more CPU than the service it was waiting for took to start:
about a third of the CPU of the test processes themselves. Clients made with
`verify=tls_context()` share one, made once per process, with httpx's default certificate
checks.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certificates checked against its CA bundle), made once."""
    return httpx.create_ssl_context()
