"""U-Net (Ronneberger et al., 2015) with its tiling geometry, and one-file model artifacts."""

from unet.artifact import ModelArtifactError, load_model, save_model
from unet.model import ModelCard, UNet, UNetConfig
from unet.receptive_field import measure_halo

__all__ = ["UNet", "UNetConfig", "ModelCard", "save_model", "load_model", "measure_halo", "ModelArtifactError"]
