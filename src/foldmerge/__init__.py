"""foldmerge: merge networks trained from different initializations on different tasks."""
from .api import evaluate, load, merge, merge_sample
from .data import Task
from .model import TaskModel

__version__ = "0.1.0"
__all__ = ["Task", "TaskModel", "evaluate", "load", "merge", "merge_sample", "__version__"]
