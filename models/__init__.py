"""ddpm_engine.models: the CARE-SST U-Net, synthetic SST data, training, checkpoints and bundled weights."""
from .registry import ARCHITECTURES, PRESETS, build_model, load_model
from .unet import CareSSTUNet

__all__ = ["ARCHITECTURES", "CareSSTUNet", "PRESETS", "build_model", "load_model"]
