"""alignloop: RLHF training system (shared core).

Kept light on purpose: importing ``alignloop`` must not import torch, ray or vllm.
"""

__version__ = "0.1.0"
