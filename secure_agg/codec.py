"""Fixed-point codec: float vectors, a weight and counters into one ring vector Z_2^k.

Layout of an encoded vector of ``m`` model values (``k`` = 32 by default, 64 optional)::

    slot 0                      weight  a_q = round(w / w_max * 2^weight_bits)   (unsigned)
    slots 1 .. 3*C              C counters, 3 limbs each (16 bit, 16 bit, signed rest),
                                counter 0 is always ``values_clipped``
    slots 3*C+1 .. 3*C+m        q_i = round(clip(d_i, -clip, clip) * a_q * 2^(f - weight_bits))

so the ring vector carries ``(w / w_max) * d`` (with the *quantized* weight ratio, so that
the server divides by exactly the sum of the weights used for scaling) in two's complement.

**Weighting choice.** The weight ``w`` is normalised by a public cap ``w_max`` (config), so the
scaled update never exceeds ``clip`` in absolute value and the overflow rule does not depend
on the weights. ``w > w_max`` is refused (ConfigurationError): pick ``w_max`` as a tight
upper bound of the largest silo, since the effective resolution of silo ``i`` is
``2^-f / a_i``.

**Headroom rule** (checked before a round by :func:`check_headroom`): with ``n`` silos,

    n * (max_weight * clip * 2^f * (1 + 2^-22) + 1)  <=  2^(k-1) - 1

where ``max_weight`` <= 1 is the largest weight ratio; then the signed sum cannot wrap.
The weight slot needs ``n * 2^weight_bits <= 2^k - 1``; counters need
``|round(v * 2^16)| < 2^(k+31) / n``.

**Error bound** (round to nearest, float32 arithmetic): per coordinate of the decoded mean
``sum(a_q d) / sum(a_q)`` (``d`` clipped),

    |err| <= n * 2^-(f+1) / A  +  clip * 2^-21

with ``A = sum(a_q) / 2^weight_bits`` the normalised weight sum; stochastic rounding doubles
the first term (and is unbiased). Replacing the quantized ratios by the exact ``w / w_max``
adds at most ``clip * n * 2^-weight_bits / A``; see :meth:`FixedPointCodec.mean_error_bound`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ConfigurationError


def _check_int(key: str, value: object, low: int, high: int) -> None:
    """Refuse a non-int (bool included) or an int outside [low, high] with a clear line."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"{key} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigurationError(f"{key}={value} is outside [{low}, {high}]")


def _check_real(key: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigurationError(f"{key} must be a number, got {type(value).__name__}")


CLIPPED_COUNTER = "values_clipped"
COUNTER_LIMBS = 3
_LIMB = 16
CHUNK_VALUES = 1 << 18
MAX_VECTOR_LENGTH = 1 << 30
"""Largest model vector a round may announce (4 GiB of uint32 per silo and for the server's
sum): a larger length is refused before anything is allocated."""
BLIND_SLOTS = 16
"""16-bit limbs of a 256-bit commitment blind (sums of up to 2^16 silos fit in 32 bits)."""
MAX_COUNTERS = 4096
"""Most counters a round may declare (each costs 3 slots)."""


def check_headroom(
    n_silos: int, clip: float, frac_bits: int, bits: int = 32, max_weight: float = 1.0
) -> None:
    """Raise ConfigurationError if the sum of ``n_silos`` encoded values could overflow.

    ``max_weight`` is the largest factor a silo multiplies its clipped update by (the
    normalised weight ``w / w_max`` <= 1 in this package).
    """
    if bits not in (32, 64):
        raise ConfigurationError(f"bits must be 32 or 64, got {bits}")
    if n_silos < 1:
        raise ConfigurationError("n_silos must be positive")
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigurationError(f"clip must be a positive finite number, got {clip}")
    if not (max_weight > 0 and math.isfinite(max_weight)):
        raise ConfigurationError(f"max_weight must be positive, got {max_weight}")
    if not 0 <= frac_bits < bits:
        raise ConfigurationError(f"frac_bits must be in [0, {bits}), got {frac_bits}")
    per_value = max_weight * clip * 2.0**frac_bits * (1 + 2.0**-22) + 1
    limit = 2.0 ** (bits - 1) - 1
    if n_silos * per_value > limit:
        worst = n_silos * per_value
        raise ConfigurationError(
            f"overflow headroom: {n_silos} silos x clip {clip} x weight {max_weight} x "
            f"2^{frac_bits} can reach {worst:.3g} > 2^{bits - 1}-1; lower frac_bits or clip, "
            f"or use bits=64"
        )


def cap_weight(
    weight: float, counters: Mapping[str, float], w_max: float
) -> tuple[float, dict[str, float]]:
    """A silo's weight capped at the public ``w_max``, its counters scaled to stay consistent.

    A silo with more examples than ``w_max`` contributes as if it had exactly ``w_max``: its
    weight becomes ``w_max`` and every counter is multiplied by ``w_max / weight`` (so the
    ``examples`` counter equals the weight and ratios such as the mean loss or accuracy are
    unchanged). This keeps each silo's counters within the bounds the server checks.
    """
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise ConfigurationError(f"weight must be finite and >= 0, got {weight}")
    if w <= w_max:
        return w, {k: float(v) for k, v in counters.items()}
    factor = w_max / w
    return float(w_max), {k: float(v) * factor for k, v in counters.items()}


@dataclass(frozen=True)
class DecodedSum:
    """What the server learns after unmasking: only sums, decoded."""

    mean: np.ndarray
    weight_sum: float
    counters: dict[str, float]
    clipped_values: int
    n_values: int
    n_contributors: int
    warnings: list[str] = field(default_factory=list)

    @property
    def clipped_fraction(self) -> float:
        """Fraction of the contributed values that were clipped."""
        total = self.n_values * max(self.n_contributors, 1)
        return self.clipped_values / total if total else 0.0


class FixedPointCodec:
    """Encode ``(w / w_max) * clip(d)``, ``w`` and counters into one uint32/uint64 vector."""

    def __init__(
        self,
        *,
        vector_length: int,
        n_silos: int,
        clip: float = 8.0,
        frac_bits: int = 22,
        bits: int = 32,
        weight_bits: int = 24,
        w_max: float = 10_000.0,
        rounding: str = "nearest",
        counter_names: tuple[str, ...] = (),
        counter_frac_bits: int = 16,
        clip_warn_fraction: float = 0.01,
        weight_proof: bool = False,
    ) -> None:
        _check_int("vector_length", vector_length, 0, MAX_VECTOR_LENGTH)
        _check_int("n_silos", n_silos, 1, 1 << 16)
        for key, value in (("frac_bits", frac_bits), ("bits", bits), ("weight_bits", weight_bits)):
            _check_int(key, value, 0, 64)
        _check_int("counter_frac_bits", counter_frac_bits, 0, 64)
        for key, value in (
            ("clip", clip),
            ("w_max", w_max),
            ("clip_warn_fraction", clip_warn_fraction),
        ):
            _check_real(key, value)
        if rounding not in ("nearest", "stochastic"):
            raise ConfigurationError(f"rounding must be 'nearest' or 'stochastic': {rounding}")
        if not isinstance(weight_proof, bool):
            raise ConfigurationError("weight_proof must be true or false")
        if not isinstance(counter_names, tuple | list) or len(counter_names) > MAX_COUNTERS:
            raise ConfigurationError(
                f"counter_names must be a list of at most {MAX_COUNTERS} names"
            )
        if not all(isinstance(c, str) and 0 < len(c) <= 64 for c in counter_names):
            raise ConfigurationError("counter names must be strings of 1..64 characters")
        if not (w_max > 0 and math.isfinite(w_max)):
            raise ConfigurationError(f"w_max must be positive and finite, got {w_max}")
        check_headroom(n_silos, clip, frac_bits, bits, 1.0)
        if not 1 <= weight_bits <= 24 or n_silos * 2**weight_bits > 2**bits - 1:
            raise ConfigurationError(
                f"weight_bits={weight_bits} must be in [1, 24] and n * 2^weight_bits < 2^{bits}"
            )
        if not 0 <= counter_frac_bits <= 30:
            raise ConfigurationError("counter_frac_bits must be in [0, 30]")
        names = tuple(counter_names)
        if CLIPPED_COUNTER in names or len(set(names)) != len(names):
            raise ConfigurationError(
                f"counter names must be distinct and must not use the reserved "
                f"{CLIPPED_COUNTER!r}: {names}"
            )
        self.vector_length = int(vector_length)
        self.n_silos = int(n_silos)
        self.clip = float(clip)
        self.frac_bits = int(frac_bits)
        self.bits = int(bits)
        self.weight_bits = int(weight_bits)
        self.w_max = float(w_max)
        self.rounding = rounding
        self.counter_names = (CLIPPED_COUNTER, *names)
        self.counter_frac_bits = int(counter_frac_bits)
        self.clip_warn_fraction = float(clip_warn_fraction)
        self.dtype = np.dtype(np.uint32 if bits == 32 else np.uint64)
        self.sdtype = np.dtype(np.int32 if bits == 32 else np.int64)
        self.fdtype = np.dtype(np.float32 if bits == 32 else np.float64)
        self.weight_proof = weight_proof
        # the blind of the weight commitment (secure_agg.range_proof), 16-bit limbs, summed
        self.blind_slots = BLIND_SLOTS if weight_proof else 0
        self.blind_offset = 1 + COUNTER_LIMBS * len(self.counter_names)
        self.header_len = self.blind_offset + self.blind_slots
        self.total_len = self.header_len + self.vector_length

    # ------------------------------------------------------------------ encode
    def quantize_weight(self, weight: float) -> int:
        """Return the quantized weight ratio ``a_q = round(w / w_max * 2^weight_bits)``."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ConfigurationError(f"weight must be finite and >= 0, got {weight}")
        if w > self.w_max:
            raise ConfigurationError(
                f"weight {w} exceeds the public cap w_max={self.w_max}; raise w_max in the "
                f"round config"
            )
        return round(w / self.w_max * (1 << self.weight_bits))

    def _encode_counter(self, name: str, value: float) -> list[int]:
        v = float(value)
        if not math.isfinite(v):
            raise ConfigurationError(f"counter {name!r} is not finite: {value}")
        iv = round(v * (1 << self.counter_frac_bits))
        hi = iv >> (2 * _LIMB)
        if abs(hi) * self.n_silos >= 2 ** (self.bits - 1):
            raise ConfigurationError(f"counter {name!r}={value} is too large to sum safely")
        mod = 1 << self.bits
        mask = (1 << _LIMB) - 1
        return [iv & mask, (iv >> _LIMB) & mask, hi % mod]

    def encode_into(
        self,
        out: np.ndarray,
        vector: np.ndarray,
        weight: float,
        counters: Mapping[str, float] | None = None,
        blind: int | None = None,
    ) -> int:
        """Encode into the preallocated ``out`` (length ``total_len``); return #clipped values.

        With ``weight_proof`` the commitment blind ``blind`` (< 2^256) is written in 16-bit
        limbs after the counters.

        Works chunk by chunk in the codec's float dtype (float32 for 32 bits): no float64
        temporary of the vector's size is created.
        """
        if out.dtype != self.dtype or out.shape != (self.total_len,):
            raise ConfigurationError("output buffer has the wrong dtype or length")
        vec = self.check_vector(vector)
        counters = dict(counters or {})
        unknown = set(counters) - set(self.counter_names[1:])
        if unknown:
            raise ConfigurationError(
                f"unknown counters {sorted(unknown)}; the round config declares "
                f"{list(self.counter_names[1:])} ({CLIPPED_COUNTER!r} is computed here)"
            )
        if self.weight_proof != (blind is not None):
            raise ConfigurationError("a commitment blind goes with weight_proof, and only with it")
        if blind is not None and not 0 <= blind < 1 << (_LIMB * BLIND_SLOTS):
            raise ConfigurationError("the commitment blind must be in [0, 2^256)")
        a_q = self.quantize_weight(weight)
        scale = self.fdtype.type(a_q) * self.fdtype.type(2.0 ** (self.frac_bits - self.weight_bits))
        clip = self.fdtype.type(self.clip)
        body = out[self.header_len :]
        sbody = body.view(self.sdtype)
        m = self.vector_length
        chunk = min(CHUNK_VALUES, max(m, 1))
        fbuf = np.empty(chunk, self.fdtype)
        bbuf = np.empty(chunk, np.bool_)
        noise = _UniformStream(chunk, self.fdtype) if self.rounding == "stochastic" else None
        clipped = 0
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            c = stop - start
            src = vec[start:stop]
            f = fbuf[:c]
            b = bbuf[:c]
            np.abs(src, out=f, casting="same_kind")
            np.greater(f, clip, out=b)
            clipped += int(np.count_nonzero(b))
            if np.isnan(f).any():
                raise ConfigurationError("vector contains NaN")
            np.clip(src, -clip, clip, out=f, casting="same_kind")
            np.multiply(f, scale, out=f)
            if noise is None:
                np.rint(f, out=f)
            else:
                np.add(f, noise.next(c), out=f)
                np.floor(f, out=f)
            np.copyto(sbody[start:stop], f, casting="unsafe")
        values = {CLIPPED_COUNTER: clipped, **counters}
        header = [a_q]
        for name in self.counter_names:
            header.extend(self._encode_counter(name, values.get(name, 0)))
        if blind is not None:
            header.extend((blind >> (_LIMB * i)) & ((1 << _LIMB) - 1) for i in range(BLIND_SLOTS))
        out[: self.header_len] = np.array(header, dtype=object).astype(self.dtype)
        return clipped

    def check_vector(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` as an array if it is 1-D floating point of ``vector_length`` values, else
        ConfigurationError (callers run this before allocating anything of the vector's size)."""
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.shape[0] != self.vector_length:
            raise ConfigurationError(
                f"vector must be 1-D of length {self.vector_length}, got shape {vec.shape}"
            )
        if vec.dtype.kind != "f":
            raise ConfigurationError(f"vector must be floating point, got {vec.dtype}")
        return vec

    def encode(
        self, vector: np.ndarray, weight: float, counters: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Encode into a fresh array (see :meth:`encode_into`)."""
        self.check_vector(vector)
        out = np.empty(self.total_len, self.dtype)
        self.encode_into(out, vector, weight, counters)
        return out

    # ------------------------------------------------------------------ checks
    def implausible(self, total: np.ndarray, n_contributors: int) -> list[str]:
        """What in an unmasked SUM of ``n_contributors`` encodings no honest set of silos can
        produce (empty list: plausible). Checked on the exact integers before decoding:

        * the weight slot ``sum a_q`` is in ``[1, n * 2^weight_bits]`` (0 only without a model
          vector, e.g. evaluation sums);
        * ``values_clipped`` is a whole number in ``[0, n * vector_length]``;
        * every model coordinate ``|sum q| <= clip * 2^(f - weight_bits) * sum a_q * (1 + 2^-22)
          + n``, i.e. the decoded mean is within ``clip`` of zero (plus rounding).

        These bound the SUM only: one dishonest silo stays unnoticed while its forgery keeps the
        sum inside them (docs/secure_agg.md, "Bounded contributions").
        """
        if total.dtype != self.dtype or total.shape != (self.total_len,):
            raise ConfigurationError("sum has the wrong dtype or length")
        n = int(n_contributors)
        problems = []
        a_sum = int(total[0])
        a_max = n << self.weight_bits
        if a_sum > a_max:
            problems.append(
                f"weight slot sums to {a_sum / (1 << self.weight_bits):.6g} x w_max, more than "
                f"{n} silos x w_max (a silo forged its weight)"
            )
        elif a_sum == 0 and self.vector_length:
            problems.append("weight slot sums to zero although a model vector was sent")
        raw = self._counter_ints(total)
        clipped = raw[CLIPPED_COUNTER]
        scale = 1 << self.counter_frac_bits
        if clipped % scale or not 0 <= clipped // scale <= n * self.vector_length:
            problems.append(
                f"values_clipped sums to {clipped / scale:.6g}, not a count in "
                f"[0, {n} x {self.vector_length}] (a silo forged its clipped counter)"
            )
        if self.vector_length and a_sum <= a_max:
            body = total[self.header_len :].view(self.sdtype)
            limit = self.clip * 2.0 ** (self.frac_bits - self.weight_bits) * a_sum
            limit = limit * (1 + 2.0**-22) + n
            low, high = int(body.min()), int(body.max())
            worst = max(-low, high)
            if worst > limit:
                problems.append(
                    f"a model coordinate of the weighted mean reaches "
                    f"{worst / limit * self.clip:.4g} in absolute value, above clip {self.clip} "
                    f"(a silo sent values beyond the clip)"
                )
        return problems

    def blind_sum(self, total: np.ndarray) -> int:
        """The exact sum of the silos' commitment blinds, from its limbs in an unmasked sum."""
        limbs = total[self.blind_offset : self.blind_offset + self.blind_slots]
        return sum(int(v) << (_LIMB * i) for i, v in enumerate(limbs))

    def _counter_ints(self, total: np.ndarray) -> dict[str, int]:
        """Exact integer counter sums (in units of 2^-counter_frac_bits) from the limbs."""
        header = [int(x) for x in total[: self.header_len]]
        half = 1 << (self.bits - 1)
        out = {}
        for i, name in enumerate(self.counter_names):
            lo, mid, hi = header[1 + 3 * i : 4 + 3 * i]
            hi = hi - (1 << self.bits) if hi >= half else hi
            out[name] = lo + (mid << _LIMB) + (hi << (2 * _LIMB))
        return out

    # ------------------------------------------------------------------ decode
    def decode_sum(
        self, total: np.ndarray, n_contributors: int, out_dtype: type = np.float32
    ) -> DecodedSum:
        """Decode an unmasked SUM of encoded vectors into the weighted mean and the sums."""
        if total.dtype != self.dtype or total.shape != (self.total_len,):
            raise ConfigurationError("sum has the wrong dtype or length")
        a_sum = int(total[0])
        counters = {
            name: iv / (1 << self.counter_frac_bits)
            for name, iv in self._counter_ints(total).items()
        }
        clipped = round(counters.pop(CLIPPED_COUNTER))
        weight_sum = a_sum / (1 << self.weight_bits) * self.w_max
        body = total[self.header_len :].view(self.sdtype)
        mean = np.empty(self.vector_length, out_dtype)
        if a_sum == 0:
            mean.fill(0)
            warnings = ["sum of weights is zero: the mean is undefined, returned zeros"]
        else:
            factor = 2.0 ** (self.weight_bits - self.frac_bits) / a_sum
            np.multiply(body, np.dtype(out_dtype).type(factor), out=mean, casting="unsafe")
            warnings = []
        result = DecodedSum(
            mean=mean,
            weight_sum=weight_sum,
            counters=counters,
            clipped_values=clipped,
            n_values=self.vector_length,
            n_contributors=n_contributors,
            warnings=warnings,
        )
        if result.clipped_fraction > self.clip_warn_fraction:
            warnings.append(
                f"{result.clipped_fraction:.2%} of the values were clipped to +/-{self.clip} "
                f"(threshold {self.clip_warn_fraction:.2%}): raise clip or check the updates"
            )
        return result

    def mean_error_bound(
        self, n: int, weight_ratio_sum: float, exact_weights: bool = False
    ) -> float:
        """Bound on |decoded float32 mean - sum(a d)/sum(a)| per coordinate (module docstring).

        ``weight_ratio_sum`` is ``sum(a_q) / 2^weight_bits``; with ``exact_weights`` the
        comparison is with the exact ratios ``w / w_max`` instead of the quantized ones.
        """
        a = max(weight_ratio_sum, 2.0**-self.weight_bits)
        rnd = 1.0 if self.rounding == "stochastic" else 0.5
        # float32 encode (32 bits) and the float32 output each cost <= 2^-24 relative
        bound = n * rnd * 2.0**-self.frac_bits / a + self.clip * 2.0**-21
        if exact_weights:
            bound += self.clip * n * 2.0**-self.weight_bits / a
        return bound


class _UniformStream:
    """Uniform [0, 1) noise for stochastic rounding, from AES-CTR seeded by os.urandom."""

    def __init__(self, chunk: int, fdtype: np.dtype) -> None:
        self._enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
        self._zeros = bytes(chunk * 4)
        self._raw = bytearray(chunk * 4 + 16)
        self._u = np.frombuffer(self._raw, np.uint32, count=chunk)
        self._f = np.empty(chunk, fdtype)
        # 24 random bits keep float32 exact and strictly below 1.
        self._scale = fdtype.type(2.0**-24)

    def next(self, c: int) -> np.ndarray:
        self._enc.update_into(memoryview(self._zeros)[: c * 4], self._raw)
        f = self._f[:c]
        np.right_shift(self._u[:c], 8, out=self._u[:c])
        np.multiply(self._u[:c], self._scale, out=f, casting="unsafe")
        return f
