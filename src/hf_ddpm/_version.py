"""The package version, in a module of its own: pyproject.toml reads it from here when building (without importing
torch), and a copy of the package vendored into a Space knows its version with no package metadata installed."""

__version__ = "0.1.0"
