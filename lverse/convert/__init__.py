"""Converters from other codebases' checkpoints into lverse's format."""
from lverse.convert.official_augvae import convert_official, load_official_checkpoint

__all__ = ["convert_official", "load_official_checkpoint"]
