"""Real components for tests and benchmarks (a SeaweedFS S3 server on loopback)."""

from .seaweedfs import SeaweedS3, free_port

__all__ = ["SeaweedS3", "free_port"]
