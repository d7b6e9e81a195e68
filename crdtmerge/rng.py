"""Counter-based random numbers keyed by content, never by the order of execution.

Layer 2 must draw the same random masks on every replica, for any thread count, device, batch
packing or library version. torch's and numpy's generators promise none of that, so the project
draws randomness from BLAKE3 in extendable-output (XOF) mode: the bytes at position ``i`` of
``BLAKE3(key=K, stream)`` depend only on ``(K, stream, i)``. A uniform float32 in ``[0, 1)`` is
the top 24 bits of each little-endian 32-bit word times ``2**-24``, which is exact in float32.

Keys come from :func:`derive_seed` (the merge's set root and recipe hash) and
:func:`tensor_key` (one key per tensor name); a *stream* (for example a contribution's root)
separates the draws of different inputs of the same tensor.

Example:
    >>> key = tensor_key(derive_seed(b"\\0" * 32, b"\\1" * 32), "w")
    >>> u = CounterRNG(key).uniform(4, stream=b"model-a")
    >>> bool(((u >= 0) & (u < 1)).all())
    True
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import torch

from .canonical import domain_hash

__all__ = ["CounterRNG", "derive_seed", "tensor_key"]

# Above this many bytes the XOF output is produced in parallel slices (seek is exact).
_PARALLEL_BYTES = 8 << 20
_SLICE_BYTES = 4 << 20


def derive_seed(set_root: bytes, recipe_hash: bytes) -> bytes:
    """The merge seed: a domain-separated hash of the live set's root and the recipe hash."""
    return domain_hash("crdtmerge/v1/seed", set_root, recipe_hash)


def tensor_key(seed: bytes, tensor_name: str) -> bytes:
    """The 32-byte key of one tensor's generator."""
    return domain_hash("crdtmerge/v1/tensor-key", seed, tensor_name.encode())


class CounterRNG:
    """Deterministic random numbers for one tensor: ``uniform(n, stream)`` is a pure function."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"CounterRNG key must be 32 bytes, got {len(key)}")
        self._key = key

    def _bytes(self, nbytes: int, stream: bytes, seek: int = 0) -> bytes:
        hasher = blake3.blake3(stream, key=self._key)
        if nbytes <= _PARALLEL_BYTES:
            return hasher.digest(length=nbytes, seek=seek)
        offsets = range(0, nbytes, _SLICE_BYTES)
        with ThreadPoolExecutor(max_workers=2) as pool:
            parts = pool.map(
                lambda off: hasher.digest(length=min(_SLICE_BYTES, nbytes - off), seek=seek + off),
                offsets,
            )
            return b"".join(parts)

    def words(self, n: int, stream: bytes, start: int = 0) -> np.ndarray:
        """Words ``start .. start + n - 1`` of the stream (uint32, little-endian), as numpy.

        ``words(n, s, start)`` equals ``words(start + n, s)[start:]`` (the XOF seeks exactly),
        so a long stream can be consumed piece by piece, or by several threads.
        """
        return np.frombuffer(self._bytes(4 * n, stream, 4 * start), dtype="<u4")

    def uniform(self, n: int, stream: bytes) -> torch.Tensor:
        """``n`` float32 uniforms in ``[0, 1)``: ``(word >> 8) * 2**-24``, exact on every CPU."""
        w = self.words(n, stream) >> np.uint32(8)
        return torch.from_numpy(w.astype(np.float32) * np.float32(2.0**-24))

    def bernoulli(
        self, shape: tuple[int, ...] | torch.Size, p: float, stream: bytes
    ) -> torch.Tensor:
        """A boolean keep-mask: element is True with probability ``p`` (``u < p``)."""
        n = 1
        for s in shape:
            n *= int(s)
        return (self.uniform(n, stream) < p).reshape(tuple(shape))
