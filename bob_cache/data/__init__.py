"""Data sources (folders, manifests, built-ins) and the Dataset that decodes their images."""

from bob_cache.data.images import ImageDataset, collate_rows, is_image_file, open_image_file
from bob_cache.data.source import DataSource, Sample, parse_source, register_source

__all__ = [
    "DataSource",
    "ImageDataset",
    "Sample",
    "collate_rows",
    "is_image_file",
    "open_image_file",
    "parse_source",
    "register_source",
]
