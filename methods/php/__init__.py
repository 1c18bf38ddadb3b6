"""PHP (Pedestrian-relevant Hierarchical Parsing): the CRFM and EFP heads on CLIP's tokens, its MoE balancing loss,
its published layout and the reference's batch-dependent evaluation mode. See README.md."""
from . import head, layout, losses  # noqa: F401 - each registers what it defines
from processor.method_presets import register_method

register_method("PHP", demo="demo", paper="php")
