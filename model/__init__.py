"""Models: `build_model(cfg, num_classes)` for training, `load_model(config_file, ...)` for trained runs, and the
registries of heads and losses (`register_head`, `register_loss`) that plug-ins extend."""
from model.build import build_model
from model.head import Head
from model.loading import load_model
from model.registry import HEADS, LOSSES, HeadContext, register_head, register_loss

__all__ = ["HEADS", "LOSSES", "Head", "HeadContext", "build_model", "load_model", "register_head", "register_loss"]
