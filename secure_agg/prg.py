"""Mask expansion: AES-128-CTR keystreams added into one preallocated accumulator.

A 32-byte seed gives the AES-128 key (first 16 bytes) and the initial counter block (last 16
bytes). Seeds are always HKDF outputs or 32 bytes from ``os.urandom``, never numpy.random.
The keystream is written into a reused scratch buffer chunk by chunk (``update_into`` over a
zero buffer) and added to / subtracted from the accumulator in place; numpy's unsigned
arithmetic wraps modulo 2^32 (or 2^64), which is exactly the ring arithmetic we need.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ConfigurationError

SEED_BYTES = 32
CHUNK_BYTES = 1 << 20


def _encryptor(seed: bytes | bytearray):
    if len(seed) not in (16, 32):
        raise ConfigurationError(f"PRG seed must be 16 or 32 bytes, got {len(seed)}")
    key = bytes(seed[:16])
    iv = bytes(seed[16:32]) if len(seed) == 32 else bytes(16)
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


class MaskAccumulator:
    """Adds/subtracts PRG(seed) streams into an unsigned accumulator, reusing one scratch."""

    def __init__(self, dtype: np.dtype | type = np.uint32, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise ConfigurationError(f"mask dtype must be uint32 or uint64, got {self.dtype}")
        self.chunk = max(1, chunk_bytes // self.dtype.itemsize)
        nbytes = self.chunk * self.dtype.itemsize
        self._zeros = memoryview(bytes(nbytes))
        self._raw = bytearray(nbytes + 16)
        self._scratch = np.frombuffer(self._raw, self.dtype, count=self.chunk)

    def apply(
        self,
        acc: np.ndarray,
        plus: Iterable[bytes | bytearray] = (),
        minus: Iterable[bytes | bytearray] = (),
    ) -> np.ndarray:
        """acc += sum PRG(plus) - sum PRG(minus), in place (mod 2^bits); returns ``acc``."""
        if acc.dtype != self.dtype or acc.ndim != 1:
            raise ConfigurationError("accumulator must be a 1-D array of the mask dtype")
        streams = [(_encryptor(s), True) for s in plus] + [(_encryptor(s), False) for s in minus]
        if not streams:
            return acc
        item = self.dtype.itemsize
        n = acc.shape[0]
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            c = stop - start
            zeros = self._zeros[: c * item]
            ks = self._scratch[:c]
            view = acc[start:stop]
            for enc, positive in streams:
                enc.update_into(zeros, self._raw)
                if positive:
                    np.add(view, ks, out=view)
                else:
                    np.subtract(view, ks, out=view)
        return acc

    def wipe(self) -> None:
        """Overwrite the scratch buffer (it last held keystream bytes)."""
        self._raw[:] = bytes(len(self._raw))


def expand(seed: bytes | bytearray, n: int, dtype: np.dtype | type = np.uint32) -> np.ndarray:
    """Return PRG(seed) as ``n`` values of ``dtype`` (a fresh array; for tests and tools)."""
    out = np.zeros(n, dtype)
    MaskAccumulator(dtype).apply(out, plus=[seed])
    return out
