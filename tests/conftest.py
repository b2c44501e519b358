import os

import torch

# Tiny models: one thread is as fast and keeps timings steady on a busy 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("FOLDMERGE_PROGRESS", "0")
