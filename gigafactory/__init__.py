"""Gigafactory: train, plan, simulate and serve Grok-class Mixture-of-Experts models."""

__version__ = "0.1.0"
