"""sparse-dreambooth: DreamBooth for SDXL with sparse parameter-efficient adapters."""

__version__ = "0.1.0"
