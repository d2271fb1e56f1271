"""Parallelism on torch.distributed: the DeviceMesh from the `parallel` config and the order parallelisms apply in."""
