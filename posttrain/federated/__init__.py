"""Federated adapter training on Flower (docs/federated.md). Flower itself is imported only where it runs."""

from posttrain.federated.config import FederatedConfig, load_federated_config
from posttrain.federated.runner import run_federated

__all__ = ["FederatedConfig", "load_federated_config", "run_federated"]
