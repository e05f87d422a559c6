"""ps3-platform: control plane (spec, compile, backends, cli) and worker runtime."""

__version__ = "0.1.0"
