"""lverse: L-Verse (AugVAE + BiART) for text->image and image->text generation."""
__version__ = "0.1.0"
