"""The fault-injecting, byte-counting S3 proxy the tests put in front of the moto server.
It lives in :mod:`deepaudit.infra.faults`, shared with ``bench/chaos.py``."""

from deepaudit.infra.faults import FaultProxy

__all__ = ["FaultProxy"]
