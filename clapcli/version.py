"""The package version, in a module of its own: any floor names it without importing the package façade."""

__version__ = "0.1.0"
