"""Training subjects and their images: the DreamBooth dataset, the user's photos, the micro subjects.

    subjects.py   find a subject, its class, kind and prompts
    captions.py   per-image captions (IMAGE.txt or metadata.jsonl) as training prompts
    images.py     one image -> pixels + SDXL micro-conditioning
    buckets.py    SDXL's aspect-ratio buckets at a resolution, and each image's nearest one
    micro.py      the micro subjects' photos, rendered offline into the cache
    download.py   fetch and check the DreamBooth dataset

torch is imported only inside `prepare_image`, so listing and downloading stay fast.
"""

from sparse_dreambooth.data.download import DATASET_URL, _packaged_manifest, download_dataset
from sparse_dreambooth.data.images import PreparedImage, prepare_image
from sparse_dreambooth.data.micro import DEMO_ALIAS_OF, DEMO_SUBJECT, MICRO_PREFIX, micro_subject_dir
from sparse_dreambooth.data.subjects import (
    IMAGE_SUFFIXES,
    LIVE_CLASSES,
    LIVE_PROMPT_TEMPLATES,
    OBJECT_PROMPT_TEMPLATES,
    PROMPTS_FILE,
    SUBJECT_KINDS,
    Subject,
    custom_subject,
    evaluation_prompts,
    find_subject,
    get_subject,
    image_files,
    instance_prompt,
    list_subjects,
    micro_subject,
    micro_subjects,
    read_prompts_and_classes,
    resolve_data_root,
)

__all__ = [
    "DATASET_URL",
    "DEMO_ALIAS_OF",
    "DEMO_SUBJECT",
    "IMAGE_SUFFIXES",
    "LIVE_CLASSES",
    "LIVE_PROMPT_TEMPLATES",
    "MICRO_PREFIX",
    "OBJECT_PROMPT_TEMPLATES",
    "PROMPTS_FILE",
    "SUBJECT_KINDS",
    "PreparedImage",
    "Subject",
    "_packaged_manifest",
    "custom_subject",
    "download_dataset",
    "evaluation_prompts",
    "find_subject",
    "get_subject",
    "image_files",
    "instance_prompt",
    "list_subjects",
    "micro_subject",
    "micro_subject_dir",
    "micro_subjects",
    "prepare_image",
    "read_prompts_and_classes",
    "resolve_data_root",
]
