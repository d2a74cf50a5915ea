"""bids-deepanat: synthesize T1-weighted images from diffusion MRI (DeepAnat) as a BIDS App."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bids-deepanat")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
