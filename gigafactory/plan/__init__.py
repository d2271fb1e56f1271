"""`gigafactory plan`: choose a parallel layout for a model on 1 to 100,000 GPUs and forecast the training run.

hardware (catalog) -> workload (shapes of one token) -> compute / comm / memory (per layer, per collective)
-> cost (one step of one layout) -> search (best fitting layout) -> forecast (days, MW, $) -> report (table, JSON).
"""
