"""Data: the embedded digits-shift benchmark and loaders for the real VQAv2, A-OKVQA, COCO and nocaps files."""

from cdcca.data.digits_shift import DOMAINS, SOURCE_DOMAIN, TARGET_DOMAINS, load_domain, training_samples
from cdcca.data.formats import load_aokvqa, load_coco_captions, load_nocaps, load_vqav2
from cdcca.data.sample import TASKS, Sample

__all__ = [
    "DOMAINS",
    "SOURCE_DOMAIN",
    "TARGET_DOMAINS",
    "TASKS",
    "Sample",
    "load_domain",
    "training_samples",
    "load_aokvqa",
    "load_coco_captions",
    "load_nocaps",
    "load_vqav2",
]
