"""TBPS-CLIP (AAAI 2024): a strong CLIP baseline: a learnt temperature, N-ITC, R-ITC, C-ITC and SS losses, its image
recipe and views, its caption augmentation and its published layout. See README.md."""
from . import augment, head, layout, losses, transforms  # noqa: F401 - each registers what it defines
from processor.method_presets import register_method

register_method("TBPS-CLIP", demo="tbps_demo", paper="tbps")
