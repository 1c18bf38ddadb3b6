"""IRRA (CVPR 2023): the ID classifier and the masked-language-model branch (implicit relation reasoning) with their
losses and inputs, and IRRA's published layout, which the releases built on its code extend. See README.md."""
from . import heads, layout, losses, masking  # noqa: F401 - each registers what it defines
from processor.method_presets import register_method

register_method("IRRA", demo="irra_demo", paper="irra")
