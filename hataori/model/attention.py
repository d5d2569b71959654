"""Causal self-attention behind one function, with pluggable backends.

Every backend computes what :func:`attention` does::

    attention(q, k, v, *, doc_ids=None, backend="sdpa") -> (B, T, n_heads, head_dim)

    q:       (B, T, n_heads, head_dim)
    k, v:    (B, T, n_kv_heads, head_dim)   n_heads % n_kv_heads == 0 (grouped-query attention;
                                             query head h reads key/value head h // (n_heads // n_kv_heads))
    doc_ids: (B, T) integer tensor, a :class:`Documents` made from one, or None. A new document
             starts wherever the id changes along T; a token attends only to earlier tokens of its
             own document. None: one document per row.

Attention is always causal and the softmax scale is ``1 / sqrt(head_dim)``. No backend hides a
non-finite input: an output position whose query, or a key or value it attends to, holds NaN or inf
is non-finite (it may also spread to positions that do not read it, a zero weight times NaN, as
fused kernels compute whole tiles), so a damaged model cannot produce normal-looking output. Document boundaries
can also be given as flash-attn style cumulative lengths over the flattened batch; convert them
with :func:`doc_ids_from_cu_seqlens` (and back with :func:`cu_seqlens_from_doc_ids`). The model
wraps its doc_ids in one :class:`Documents` per forward pass, so every layer shares the positions
and the cumulative lengths (whose computation waits for the GPU).

Backends register themselves in :data:`BACKENDS` with a function ``fn(q, k, v, *, docs)`` (docs a
:class:`Documents` or None) and an
``unavailable()`` check that returns why the backend cannot run here (or None). Choosing a backend
that cannot run is an error; there is no silent fallback. The backends:

- ``sdpa``: torch's ``scaled_dot_product_attention``, any device and dtype; the reference every
  other backend is tested against.
- ``triton``: hataori.kernels.attention (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests).
- ``flash_attn``: the flash-attn package (``pip install 'hataori[gpu]'`` on a CUDA machine);
  fp16/bf16 on CUDA only.
- ``auto``: chooses per call from the tensors it gets: ``flash_attn`` when flash-attn is installed
  and the inputs are fp16/bf16 on CUDA, else ``triton`` on CUDA when triton is installed and the
  head dim is one the kernel has (see :func:`auto_choice`), else ``sdpa``. It always runs; CPU runs
  (tests, the toy preset) get ``sdpa``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hataori.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    """An attention implementation and a check of whether it can run in this environment."""

    fn: Callable[..., torch.Tensor]
    """``fn(q, k, v, *, docs)``, shapes as in the module docstring, docs a :class:`Documents` or None."""
    unavailable: Callable[[], str | None]
    """Returns why the backend cannot run here (missing package, no GPU), or None if it can.
    Called on every attention call, so it caches anything slow."""


BACKENDS: dict[str, Backend] = {}
"""Attention backends by the name a config chooses them with."""


def register_backend(name: str, fn: Callable[..., torch.Tensor],
                     unavailable: Callable[[], str | None] = lambda: None) -> None:
    """Make ``fn`` choosable as ``attention_backend: name``."""
    if name in BACKENDS:
        raise ValueError(f"attention backend {name!r} is registered twice")
    BACKENDS[name] = Backend(fn, unavailable)


def get_backend(name: str) -> Callable[..., torch.Tensor]:
    """The attention function called ``name``; a :class:`ConfigError` if unknown or unable to run."""
    if name not in BACKENDS:
        raise ConfigError("attention_backend", f"unknown attention backend {name!r}; "
                          f"choose one of {', '.join(sorted(BACKENDS))}")
    reason = BACKENDS[name].unavailable()
    if reason is not None:
        raise ConfigError("attention_backend", f"attention backend {name!r} cannot run here: {reason}; "
                          f"choose another of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name].fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              doc_ids: torch.Tensor | Documents | None = None, backend: str = "sdpa") -> torch.Tensor:
    """Causal (optionally document-masked) grouped-query attention; see the module docstring."""
    docs = doc_ids if isinstance(doc_ids, Documents) or doc_ids is None else Documents(doc_ids)
    _check_shapes(q, k, v, docs.doc_ids if docs is not None else None)
    return get_backend(backend)(q, k, v, docs=docs)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention expects q (B, T, H, D) and k, v (B, T, H_kv, D) of equal shapes; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} need the same B, T and head_dim, "
                         f"and a number of query heads divisible by the number of key/value heads")
    if doc_ids is not None and doc_ids.shape != q.shape[:2]:
        raise ValueError(f"doc_ids must have shape (B, T) = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")


# ----------------------------------------------------------------------------- document layout


class Documents:
    """The packed documents of one (B, T) batch, each derived form computed once when first used."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        """(B, T) document of each token; a new document starts where the id changes."""

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """(B, T) long: each token's position within its document (:func:`document_positions`)."""
        return document_positions(self.doc_ids)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 cumulative document lengths over the flattened batch (:func:`cu_seqlens_from_doc_ids`)."""
        return cu_seqlens_from_doc_ids(self.doc_ids)

    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool attention mask (:func:`document_mask`); built anew by each call rather
        than kept, as it is B * T^2 bytes."""
        return document_mask(self.doc_ids)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document begins (position 0 and wherever the id changes)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend key s: s <= t and both in one document."""
    segment = document_starts(doc_ids).cumsum(dim=1)  # (B, T): contiguous runs numbered 1, 2, ...
    same_doc = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)  # (B, 1, T, T), broadcast over heads


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) long: each token's position within its own document (restarts at 0 at every start)."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    start_index = torch.where(document_starts(doc_ids), index, 0).cummax(dim=1).values  # (B, T)
    return index - start_index


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """(B, T) document ids from cumulative lengths over the flattened batch.

    ``cu_seqlens`` is flash-attn's varlen layout: ``[0, len_0, len_0 + len_1, ..., B * T]``. A
    document that runs past the end of a row is cut there, as the rows are separate sequences.
    """
    if cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != batch * seq_len:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at B * T = {batch * seq_len}")
    flat = torch.arange(batch * seq_len, device=cu_seqlens.device)  # (B * T,)
    doc = torch.searchsorted(cu_seqlens[1:], flat, right=True)  # (B * T,) index of each token's document
    return doc.view(batch, seq_len)  # (B, T)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative document lengths over the flattened batch (flash-attn's varlen layout)."""
    starts = document_starts(doc_ids).flatten()  # (B * T,); every row starts a document
    start_index = starts.nonzero().flatten()  # (n_docs,)
    end = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    return torch.cat([start_index, end]).to(torch.int32)  # (n_docs + 1,)


# ----------------------------------------------------------------------------- backends


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   docs: Documents | None = None) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention``: the reference backend, any device and dtype.

    Without documents, SDPA's own causal path with ``enable_gqa`` reads each key/value head for its
    group of query heads without copying. With documents it takes an explicit (B, 1, T, T) boolean
    mask, which costs T^2 bytes per row; the key/value heads are then repeated to n_heads first
    (n_heads / n_kv_heads times their memory), because CUDA's memory-efficient kernel, the one that
    accepts a mask, does not take grouped heads and SDPA would otherwise fall back to its unfused
    math path.
    """
    out = _sdpa(*(x.transpose(1, 2) for x in (q, k, v)), docs=docs).transpose(1, 2)  # (B, T, H, D)
    with torch.no_grad():
        if q.device.type == "cpu" and all(torch.isfinite(x).all() for x in (q, k, v)):
            return out  # the usual case, told apart at the cost of one read (a GPU would wait for it)
        bad = reads_nonfinite(q, k, v, docs=docs)[..., None]  # (B, T, H, 1)
    return out.masked_fill(bad, float("nan"))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, docs: Documents | None) -> torch.Tensor:
    """SDPA on (B, H, T, D) queries and (B, H_kv, T, D) keys and values."""
    if docs is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(group, dim=1)  # (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=docs.mask())


def reads_nonfinite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, docs: Documents | None) -> torch.Tensor:
    """(B, T, H) bool: True where a query, or a key or value of its document at or before it, is not finite.

    SDPA's fused CPU kernels return finite rows for some of these (a NaN query among them), so the
    ``sdpa`` backend sets them to NaN; the check costs a pass over q, k and v, no T^2 mask.
    """
    group = q.shape[2] // k.shape[2]
    bad_kv = (~torch.isfinite(k).all(-1) | ~torch.isfinite(v).all(-1)).long()  # (B, T, H_kv)
    before = bad_kv.cumsum(1)  # (B, T, H_kv): non-finite keys/values at or before each position
    if docs is not None:  # less those before the position's document began
        index = torch.arange(q.shape[1], device=q.device).expand_as(docs.doc_ids)
        start = torch.where(document_starts(docs.doc_ids), index, 0).cummax(dim=1).values  # (B, T)
        earlier = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=1)  # (B, T, H_kv)
        before = before - earlier.gather(1, start[..., None].expand_as(before))
    return ~torch.isfinite(q).all(-1) | (before > 0).repeat_interleave(group, dim=2)  # (B, T, H)


register_backend("sdpa", sdpa_attention)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     docs: Documents | None = None) -> torch.Tensor:
    """hataori.kernels.attention's FlashAttention-2 style kernel; documents become its varlen layout."""
    from hataori.kernels.attention import flash_attention  # imports triton (optional): only for this backend

    if docs is None:
        return flash_attention(q, k, v)
    B, T, H, Dh = q.shape
    q, k, v = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))  # (B * T, heads, Dh)
    out = flash_attention(q, k, v, cu_seqlens=docs.cu_seqlens, max_seqlen=T)  # (B * T, H, Dh)
    return out.view(B, T, H, Dh)


@functools.cache
def triton_installed() -> bool:
    """Whether the triton package can be found (it is imported only where its kernels are used)."""
    return importlib.util.find_spec("triton") is not None


def _triton_unavailable() -> str | None:
    if not triton_installed():
        return "triton is not installed (pip install triton)"
    from hataori.kernels.attention import unavailable_reason  # imports triton (optional): only once it is found

    return unavailable_reason()


register_backend("triton", triton_attention, _triton_unavailable)


# flash-attn: its own CUDA kernels (fp16/bf16), imported when first used.


@functools.cache
def _flash_attn_module():
    """The flash_attn package, or None when it is not installed (or fails to import)."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _flash_attn_unavailable() -> str | None:
    if _flash_attn_module() is None:
        return "flash-attn is not installed (pip install 'hataori[gpu]' on a machine with CUDA)"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA device and none is visible"
    return None


FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         docs: Documents | None = None) -> torch.Tensor:
    """flash-attn's kernels: ``flash_attn_func`` per row, or its varlen form over packed documents.

    flash-attn reads grouped key/value heads itself and takes the (B, T, heads, Dh) layout as is.
    Its inputs must be fp16 or bf16 on a CUDA device.
    """
    if q.device.type != "cuda" or q.dtype not in FLASH_ATTN_DTYPES:
        raise ValueError(f"the flash_attn backend runs fp16/bf16 tensors on a CUDA device; got {q.dtype} on "
                         f"{q.device} (choose attention_backend: auto to fall back where it cannot run)")
    fa = _flash_attn_module()
    if docs is None:
        return fa.flash_attn_func(q, k, v, causal=True)
    B, T, H, Dh = q.shape
    cu_seqlens = docs.cu_seqlens  # (n_docs + 1,) int32
    q, k, v = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))  # (B * T, heads, Dh)
    out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                    max_seqlen_q=T, max_seqlen_k=T, causal=True)  # (B * T, H, Dh)
    return out.view(B, T, H, Dh)


register_backend("flash_attn", flash_attn_attention, _flash_attn_unavailable)


# auto: the fastest backend that can run the call in hand.


def auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend ``auto`` uses for queries of ``dtype`` and ``head_dim`` on ``device``.

    On CUDA, flash-attn takes fp16/bf16; the Triton kernel takes the head dims it was written for
    (hataori.kernels.attention.HEAD_DIMS), in fp16, bf16 or fp32. Everything else goes to SDPA.
    """
    if device.type != "cuda":
        return "sdpa"
    if dtype in FLASH_ATTN_DTYPES and _flash_attn_unavailable() is None:
        return "flash_attn"
    if triton_installed():
        from hataori.kernels.attention import DTYPES, HEAD_DIMS  # imports triton (optional): only on CUDA, once found

        if head_dim in HEAD_DIMS and dtype in DTYPES:
            return "triton"
    return "sdpa"


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend that runs for ``attention_backend: name``: ``name`` itself, or auto's choice."""
    return auto_choice(device, dtype, head_dim) if name == "auto" else name


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   docs: Documents | None = None) -> torch.Tensor:
    """Whichever backend :func:`auto_choice` picks for these tensors."""
    return BACKENDS[auto_choice(q.device, q.dtype, q.shape[-1])].fn(q, k, v, docs=docs)


register_backend("auto", auto_attention)
