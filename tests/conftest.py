import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). It must be chosen
# before the kernels are defined, that is before `model` is imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests compare numbers, not speed: one thread keeps them deterministic and leaves the
# other core to pytest's own work.
torch.set_num_threads(1)
