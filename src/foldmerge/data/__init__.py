"""Data: packaged data sets, task splits and merge samples."""
from .datasets import DataMissing, load_images
from .tasks import Task, parse_tasks

__all__ = ["DataMissing", "Task", "load_images", "parse_tasks"]
