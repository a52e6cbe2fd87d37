"""atelier: briefs in, finished images with full lineage out."""

__version__ = "0.1.0"
