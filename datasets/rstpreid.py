"""RSTPReid: `<root>/RSTPReid/imgs/...` and `data_captions.json` (keys id, img_path, captions, split)."""
from __future__ import annotations

from datasets.base import AnnotationFormat
from datasets.registry import register_format

FORMAT = AnnotationFormat(name="RSTPReid", folder="RSTPReid", annotation_files=("data_captions.json",),
                          path_key="img_path")


register_format(FORMAT)
