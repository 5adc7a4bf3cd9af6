"""The one codec of the compressed artifacts: integer codes packed at b bits, then xz.

PyTorch stores an integer code in at least a byte. :func:`pack_codes` writes ``b`` bits per value
(``numpy.packbits`` over the bit planes), for the quantized student's weights
(:mod:`distill.compress.quant.artifact`) and the shared-weight student's cluster indices
(:mod:`distill.compress.sharing`). The ``torch.save`` payload holding them is then compressed with
:func:`xz_compress` (stdlib ``lzma``), which entropy-codes the codes: trained weights cluster near
zero, so their codes are far from uniform.
"""

from __future__ import annotations

import io
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import CheckpointError

XZ_MAGIC = b"\xfd7zXZ\x00"
# lc=0, pb=0: the codes are close to independent symbols, so conditioning the literal coder on
# the previous byte or on the position only dilutes its statistics (measured: ~2 % smaller).
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]


def pack_codes(values: torch.Tensor, bits: int, low: int) -> torch.Tensor:
    """Integers in ``[low, low + 2^bits)`` -> a uint8 tensor holding ``bits`` bits per value."""
    codes = values.reshape(-1).to(torch.int64) - low
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"values outside the {bits}-bit range starting at {low}")
    planes = (codes.numpy()[:, None] >> np.arange(bits)) & 1
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, low: int, count: int) -> torch.Tensor:
    planes = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(axis=1) + low)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def xz_compress(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, filters=XZ_FILTERS)


def xz_decompress(data: bytes) -> bytes:
    return lzma.decompress(data)


def read_xz_payload(path: str | Path, what: str = "compressed artifact") -> dict[str, Any]:
    """The ``torch.save`` dict inside an xz artifact (``weights_only`` load), or a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        payload = torch.load(io.BytesIO(xz_decompress(path.read_bytes())), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not an artifact at all
        raise CheckpointError(f"{what} {path} is corrupt or not a distill artifact: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{what} {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def is_xz(path: str | Path) -> bool:
    """Whether the file starts with the xz magic bytes (a compressed artifact, not a checkpoint)."""
    with open(path, "rb") as fh:
        return fh.read(len(XZ_MAGIC)) == XZ_MAGIC
