"""The compiler's one error type, importable without the rest of the package."""


class CompileError(ValueError):
    """A spec that validated but cannot become valid Kubernetes objects (one-line message)."""
