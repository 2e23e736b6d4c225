"""Training on several processes with torch.distributed: launching them (``launch``), the world a process
belongs to (``world``), data parallelism of the LoRA gradients (``ddp``), each rank's share of the batches
(``data``), the offload mode's host memory per rank (``host_memory``) and sharded weights (``fsdp``)."""
