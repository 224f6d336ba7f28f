""" run by the distributed test under torchrun: train with gpt.main, then save this process's weights """
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

model = gpt.main(sys.argv[1:])
torch.save(model.state_dict(), f"weights_rank{os.environ['RANK']}.pt")
