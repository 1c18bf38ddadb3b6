"""Models: `build_model(cfg, num_classes)` for training, `load_model(config_file, ...)` for trained runs."""
from model.build import build_model
from model.loading import load_model

__all__ = ["build_model", "load_model"]
