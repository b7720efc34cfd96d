import torch

# Tests compare numbers, not speed: one thread keeps them deterministic and leaves the
# other core to pytest's own work.
torch.set_num_threads(1)
