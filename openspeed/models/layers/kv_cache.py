"""Key/value cache for incremental decoding with the shared decoder (:mod:`openspeed.models.layers.decoder`).

A :class:`KVCache` holds, for every decoder layer, the rotated keys and the values of every token seen
so far, laid out ``(batch, kv_heads, length, head_dim)`` like the attention inputs. It also holds the
M-RoPE position the next text token of each row takes, so decode steps need neither the prompt's
vision grids nor its token ids. The model fills it: pass an empty cache with the prompt (the
"prefill"), then the same cache with one new token per row at a time.

Storage is allocated on the first append of each layer for ``capacity`` tokens (prompt plus the
tokens to generate), on the device and in the dtype of the keys and values appended (so the cache
lives where the model runs), and filled in place; appending past the capacity re-allocates with
room to spare. Appending reads nothing back to the host (lengths are Python integers), so a decode
step's layers queue their work without waiting for the device.
Under tensor parallelism each rank's cache holds its own heads (the projections' local outputs).
"""

from __future__ import annotations

import torch


class LayerKV:
    """One decoder layer's cached keys and values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (batch, kv_heads, new, head_dim) after the cached tokens; return all of them."""
        new = k.shape[2]
        end = self.length + new
        if self._keys is None or end > self._keys.shape[2]:
            size = max(self.capacity, end) if self._keys is None else max(end, 2 * self._keys.shape[2])
            keys = k.new_empty(k.shape[0], k.shape[1], size, k.shape[3])
            values = v.new_empty(v.shape[0], v.shape[1], size, v.shape[3])
            if self._keys is not None:
                keys[:, :, : self.length] = self._keys[:, :, : self.length]
                values[:, :, : self.length] = self._values[:, :, : self.length]
            self._keys, self._values = keys, values
        self._keys[:, :, self.length : end] = k
        self._values[:, :, self.length : end] = v
        self.length = end
        return self._keys[:, :, :end], self._values[:, :, :end]


class KVCache:
    """Keys and values of every decoder layer, plus each row's next text position.

    Args:
        num_layers: decoder layers of the model (``config.text.num_hidden_layers``).
        capacity: tokens to allocate room for per row (prompt length + tokens to generate); a
            smaller value still works, with re-allocation.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerKV(capacity) for _ in range(num_layers)]
        # (batch,) long: the M-RoPE position (all three sections alike) of each row's next text token;
        # set by the prefill, advanced by every decode step for the rows whose new token is real.
        self.next_positions: torch.Tensor | None = None

    def __len__(self) -> int:
        """Tokens (columns, padding included) cached so far."""
        return self.layers[0].length if self.layers else 0

    def layer(self, index: int) -> LayerKV:
        """The cache of decoder layer ``index`` (full-model numbering)."""
        return self.layers[index]
