"""The package version, read from the installed package's metadata (``pyproject.toml``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("logix-func")
except PackageNotFoundError:  # a source tree on the path that was never installed
    __version__ = "0+unknown"
