"""The state of every RNG a training step may draw from, saved in checkpoints so that a resumed run draws
what the uninterrupted one would have drawn."""

import random

import numpy as np
import torch


def rng_states() -> dict:
    """Every RNG a training step may draw from, as plain values and tensors (checkpoints are read back
    with torch.load(weights_only=True), which refuses numpy arrays)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                         has_gauss, cached_gaussian],
              "python": [version, list(python_state), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
