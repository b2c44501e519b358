"""foldmerge: merge networks trained from different initializations on different tasks."""
from .api import evaluate, load, merge, merge_form, merge_sample
from .arch import register_arch
from .data import Task
from .model import TaskModel
from .trace import register_traced

__version__ = "0.1.0"
__all__ = ["Task", "TaskModel", "evaluate", "load", "merge", "merge_form", "merge_sample", "register_arch", "register_traced",
           "__version__"]
