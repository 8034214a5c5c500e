"""fcmoe: federated fine-tuning of Mixture-of-Experts language models with FC-MoE and its baselines."""

import os

from fcmoe.process_memory import reuse_freed_memory

__version__ = "0.1.0"

# 2 MiB transparent huge pages for CPU tensors of 2 MiB and more: PyTorch's own switch, read once at its first
# allocation, so it takes effect when fcmoe is imported before torch allocates. A fresh 400 MB tensor (one round's
# new expert weights at 10^8 floats) costs 0.73 s of 4 KiB page faults on our 2-core VM and 0.05 s with huge pages
# (add_to_experts, measured side by side); FC-MoE's whole server step went from 2.09 s to 0.57 s. Set
# THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# glibc: keep freed blocks for reuse within a round (fcmoe.process_memory; FCMOE_MALLOC_TUNING=0 opts out)
reuse_freed_memory()
