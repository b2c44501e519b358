"""The package's version, in the one place the build (pyproject.toml) and the code read it."""
__version__ = "0.1.0"
