from __future__ import annotations


def apply_full(model, cfg=None):
    """Train every parameter."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
