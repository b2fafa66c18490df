"""Training subjects and their images: the DreamBooth dataset, the user's photos, a synthetic demo.

    subjects.py   find a subject, its class, kind and prompts
    images.py     one image -> pixels + SDXL micro-conditioning
    demo.py       the offline demo subject, drawn from fixed seeds
    download.py   fetch and check the DreamBooth dataset

torch is imported only inside `prepare_image`, so listing and downloading stay fast.
"""

from sparse_dreambooth.data.demo import DEMO_IMAGE_COUNT, demo_subject_dir
from sparse_dreambooth.data.download import DATASET_URL, _packaged_manifest, download_dataset
from sparse_dreambooth.data.images import PreparedImage, prepare_image
from sparse_dreambooth.data.subjects import (
    DEMO_CLASS,
    DEMO_SUBJECT,
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
    instance_prompt,
    list_subjects,
    read_prompts_and_classes,
    resolve_data_root,
)

__all__ = [
    "DATASET_URL",
    "DEMO_CLASS",
    "DEMO_IMAGE_COUNT",
    "DEMO_SUBJECT",
    "IMAGE_SUFFIXES",
    "LIVE_CLASSES",
    "LIVE_PROMPT_TEMPLATES",
    "OBJECT_PROMPT_TEMPLATES",
    "PROMPTS_FILE",
    "SUBJECT_KINDS",
    "PreparedImage",
    "Subject",
    "_packaged_manifest",
    "custom_subject",
    "demo_subject_dir",
    "download_dataset",
    "evaluation_prompts",
    "find_subject",
    "get_subject",
    "instance_prompt",
    "list_subjects",
    "prepare_image",
    "read_prompts_and_classes",
    "resolve_data_root",
]
