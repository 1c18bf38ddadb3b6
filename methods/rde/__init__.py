"""RDE (CVPR 2024): noisy-correspondence learning with TSE (token selection embedding), TAL (triplet alignment
loss) and CCD (consensus division, before every epoch), its caption augmentation and its published layout. See
README.md."""
# The names this method registers under, in one place: a copy of this folder given through custom_imports is a new
# method once these differ (its options, declared the same way, are shared).
HEAD, LOSS, SELECTION, AUGMENT, LAYOUT, METHOD = "tse", "tal", "ccd", "rde", "rde", "RDE"

from processor.method_presets import register_method  # noqa: E402

from . import augment, ccd, layout, tal, tse  # noqa: E402,F401 - each registers what it defines

register_method(METHOD, demo="rde_demo", paper="rde")
