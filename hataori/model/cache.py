"""The key/value cache for generation: a batch of prompts prefilled at once, then one token at a time.

Layout. A :class:`KVCache` holds, for a batch of B rows, every layer's keys and values as two tensors of
(B, H_kv, capacity, Dh) in the model's dtype, each head's positions contiguous as attention reads them: the
keys after qk-norm and rotary, the values as projected. Grouped-query attention keeps only the H_kv
key/value heads (each serves H / H_kv query heads), so a position costs ``2 * n_layers * H_kv * Dh``
elements a row (:func:`bytes_per_token`). Beside them, for the batch:

* ``valid`` (B, capacity) bool: which filled positions hold a real token, False for padding;
* ``positions`` (B,) int64: the rotary position of each row's next token (its real tokens so far);
* ``length``: how many positions are filled, the same for every row.

Prompts of different lengths are left-padded to the longest (:func:`left_pad`), so every row's next token
lands at index ``length`` and one write serves the batch; a row's positions count only its real tokens, so
its first token is at position 0 whatever its padding, as in training.

Attention over the cache: each new token's query attends to the cached and new keys at or before its own
index that hold real tokens (a padding query attends to itself, so that no row of the softmax is empty). It
runs as PyTorch's scaled_dot_product_attention with that boolean mask and the key/value heads shared
across their query groups, whatever ``attention_backend`` the model trains with: the training kernels
take whole sequences without a cache. Generation with the cache computes the same function as the model's
forward over each row's unpadded tokens (tests/test_kv_cache.py), in another summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Bytes the cache takes per position of one row: keys and values of every layer's H_kv heads."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid), each (B, longest): the prompts right-aligned, ``pad_id`` before the shorter ones."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            valid[row, longest - len(prompt):] = True
    return ids, valid


@dataclass
class KVCache:
    """Keys and values of every layer for a batch (module docstring); make one with :meth:`empty`."""

    keys: list[torch.Tensor]
    """Per layer (B, H_kv, capacity, Dh)."""
    values: list[torch.Tensor]
    """Per layer (B, H_kv, capacity, Dh)."""
    valid: torch.Tensor
    """(B, capacity) bool: the filled positions that hold a real token."""
    positions: torch.Tensor
    """(B,) int64: the rotary position of each row's next token."""
    length: int = 0
    """Positions filled, the same for every row."""
    mask: torch.Tensor | None = None
    """The current forward's attention mask (B, 1, T, length + T), set by :meth:`advance`; None for a first
    forward without padding, which is plain causal attention."""
    bad: list[torch.Tensor] | None = None
    """Per layer (B, capacity, H_kv) bool: where a stored key or value is not finite (checked as it is
    written, so that no step reads the whole cache again to find out)."""
    nonfinite: list[bool] | None = None
    """Per layer: whether any stored key or value is not finite (CPU, where the check is one read)."""

    @classmethod
    def empty(cls, cfg, batch: int, capacity: int, *, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """A cache for ``batch`` rows of up to ``capacity`` positions (at most ``cfg.max_seq_len``)."""
        if not 0 < capacity <= cfg.max_seq_len:
            raise ValueError(f"capacity must be in [1, max_seq_len={cfg.max_seq_len}], got {capacity}")
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        flags = (batch, capacity, cfg.n_kv_heads)
        return cls(keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   bad=[torch.zeros(flags, device=device, dtype=torch.bool) for _ in range(cfg.n_layers)],
                   valid=torch.zeros((batch, capacity), device=device, dtype=torch.bool),
                   positions=torch.zeros(batch, device=device, dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]  # (B, capacity)

    def advance(self, valid: torch.Tensor) -> torch.Tensor:
        """Take T new tokens (``valid`` (B, T): False where a token is padding) and return their rotary
        positions (B, T); sets the forward's attention mask. :meth:`write` then stores each layer's keys
        and values at indices length .. length + T - 1, and :meth:`done` moves ``length`` on."""
        B, T = valid.shape
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {start} are filled and {T} more do not fit")
        positions = (self.positions[:, None] + valid.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        self.valid[:, start:end] = valid
        keys_valid = self.valid[:, None, :end]  # (B, 1, end)
        if start == 0 and bool(valid.all()):  # a prefill without padding: causal attention, no mask to build
            self.mask = None
            self.positions += T
            return torch.arange(T, device=valid.device).expand(B, T)
        keys_at = torch.arange(end, device=valid.device)[None, :]  # (1, end)
        queries_at = torch.arange(start, end, device=valid.device)[:, None]  # (T, 1)
        mask = (keys_valid & (keys_at <= queries_at)[None]) | (keys_at == queries_at)[None]  # (B, T, end)
        self.mask = mask[:, None]  # (B, 1, T, end): one mask for every head
        self.positions += valid.sum(dim=1)
        return positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store layer ``layer``'s new k, v (B, T, H_kv, Dh) and attend q (B, T, H, Dh) to every filled
        position; (B, T, H, Dh)."""
        T = q.shape[1]
        start, end = self.length, self.length + T
        self.keys[layer][:, :, start:end] = k.transpose(1, 2)
        self.values[layer][:, :, start:end] = v.transpose(1, 2)
        written = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, T, H_kv)
        self.bad[layer][:, start:end] = written
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, H_kv, end, Dh)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.mask,
                                             is_causal=self.mask is None, enable_gqa=q.shape[2] != k.shape[2])
        out = out.transpose(1, 2)  # (B, T, H, Dh)
        if q.device.type == "cpu":  # SDPA's CPU kernels can return finite rows for a NaN query: check, once
            if self.nonfinite is None:
                self.nonfinite = [False] * len(self.keys)
            self.nonfinite[layer] |= bool(written.any())
            if not self.nonfinite[layer] and bool(torch.isfinite(q).all()):
                return out
        # every query that reads a non-finite query, key or value gives NaN (hataori.model.attention's rule)
        bad_kv = self.bad[layer][:, :end]  # (B, end, H_kv)
        mask = self.mask[:, 0] if self.mask is not None else torch.ones(T, end, dtype=torch.bool,
                                                                         device=q.device).tril()[None]
        reads = (mask[..., None] & bad_kv[:, None]).any(dim=2)  # (B, T, H_kv)
        bad = ~torch.isfinite(q).all(-1) | reads.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (B, T, H)
        return out.masked_fill(bad[..., None], float("nan"))

    def done(self, tokens: int) -> None:
        """The forward over ``tokens`` new tokens has written every layer."""
        self.length += tokens
        self.mask = None
