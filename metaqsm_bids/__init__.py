"""metaqsm: quantitative susceptibility mapping from multi-echo GRE, as a BIDS App."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metaqsm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
