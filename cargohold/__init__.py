"""cargohold: a clustered OCI container image registry."""

__version__ = "0.1.0"
