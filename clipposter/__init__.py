"""clipposter: movie-poster analysis on frozen CLIP embeddings."""
from clipposter.errors import ClipposterError, PosterError
from clipposter.records import PosterRecord

__version__ = "0.1.0"
__all__ = ["ClipposterError", "PosterError", "PosterRecord", "__version__"]
