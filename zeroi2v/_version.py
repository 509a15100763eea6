"""The package version, importable from any layer (the package root imports everything)."""
__version__ = "0.1.0"
