"""What a checkpoint stores beside the arrays, as JSON: the run key and the train iterator's position.

`rosjax.checkpoint` puts the run key into a checkpoint's meta item (`key_to_json`) and hands
grain's Orbax handler an `IteratorPosition` for the data item; neither needs Orbax itself.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


class IteratorPosition:
    """A frozen iterator position in the form grain's Orbax handler saves and restores.

    The loop prefetches batches, so the live iterator is ahead of the last batch trained on;
    it records the position after each batch and saves that one. Grain's handler writes
    `get_state()` as text (one file per process) and on restore calls `set_state()` and
    `start_prefetch()`.
    """

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Nothing to prefetch: this object only carries a position."""


def key_to_json(key: jax.Array) -> dict[str, Any]:
    """A typed PRNG key as JSON: its implementation's name and its raw uint32 data."""
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}


def key_from_json(payload: dict[str, Any]) -> jax.Array:
    """The key `key_to_json` wrote, bit for bit."""
    return jax.random.wrap_key_data(np.asarray(payload["data"], np.uint32), impl=payload["impl"])
