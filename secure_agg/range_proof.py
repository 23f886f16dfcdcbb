"""Pedersen commitments and a zero-knowledge proof that a committed integer is in [0, 2^L].

Used for the weight slot (``RoundConfig.weight_proof``): each silo commits to its quantized
weight ``a`` as ``C = G^a H^r mod P`` and proves ``0 <= a <= 2^weight_bits`` without revealing
``a``; the blind ``r`` rides (in 16-bit limbs) inside the masked vector, so after unmasking the
server knows ``A = sum a`` and ``R = sum r`` and checks ``prod C = G^A H^R``. A silo whose weight
slot differs from its committed ``a`` would need ``log_G H`` to pass that check.

Group: a 2048-bit prime ``P`` with a 256-bit prime-order subgroup (order ``Q``, generator
``G``), generated once with ``cryptography``'s DSA parameter generation and fixed here; ``H``
is hashed into the subgroup (nobody knows ``log_G H``). Range proof: bit decomposition, one
Chaum-Pedersen OR-proof (Cramer-Damgard-Schoenmakers) per bit that its commitment opens to 0
or 1, made non-interactive by Fiat-Shamir with SHA-256 over a caller-given context (run,
round, silo). ``0 <= a <= 2^L`` is shown as ``a < 2^(L+1)`` and ``2^L - a < 2^(L+1)``.
Perfectly hiding commitments, honest-verifier zero-knowledge proofs, soundness under the
discrete logarithm assumption in the random-oracle model.
"""

from __future__ import annotations

import hashlib
import secrets

from .errors import BadSignature, MalformedMessage

P = int(
    "df32647632d72228bf4705b29fd001dbee6dbdee23368984fc9d69027cdc2da1df48455b3d3d6305"
    "6633559110e67caee63e4eefddbdaa03c2880fc20a47cae25577f7b0e48db0c825096eb0219531dc"
    "68b19b46a951a5e821ab14c907c44b437a064e2993f93dafbdbc65545538e4cb83d249724cd3c073"
    "ff72aa8aa269c7be958be2b8b0dff055ff43a41ded36d99f56d7c4efe91c5f099087938d3cd12bec"
    "7a42cef5e21e69a0d254ad1f6c03c5791874e19473f394cf416bdd3a6781357f77af4b247b17ade0"
    "93aefdcce763d14b159968b9630f4c0d49afe8c73b6dd1a7083dcee8802a99e9a5d0d06226def99a"
    "0e93578033ba5218d19c03d6a4a619c9",
    16,
)
Q = int(
    "e840b2e0ecfd7a89aea0ed30fd1eb288c2d15a3a7244aad4234b6d6dba8529b1",
    16,
)
G = int(
    "c07bc16977724706cc8ce27f0e730959cb24f94b9cc46a2c382c44b1a6fd0290c798deca8a8a2a7a"
    "a6e0ea93725479b3e0c67ca7954ccebfbbe7aa89f3e69c6f80ec47674138855c9b762ebb1fa82796"
    "2e2b3b1819b6f949f49ee8ff526cb3925fd57078039c40bead99fe2669ca7239359c91d912bfc9d8"
    "eadaac72c4f95d5888285c6ead82228040f42d748df1b4497638fb14573d8251f4651c8c6ec8ba8d"
    "043c317e9c5ba03a721efde6ed01b22f36df4d26137cc4b6a54a3aa276815a9bc187ca7ff4422f73"
    "e5bf06482c2c15820ef9766a3ae7d4bd60061e887806939471a4d35814962a51b91b2db1ef927f8d"
    "c5746bb11b46760fe374e01e6c1e5aa7",
    16,
)
_ELEMENT = 256  # bytes of a group element
_SCALAR = 32  # bytes of an exponent
_BIT_PROOF = _ELEMENT + 4 * _SCALAR


def _hash_to_group(label: bytes) -> int:
    stream = b"".join(hashlib.sha512(label + bytes([i])).digest() for i in range(5))
    return pow(int.from_bytes(stream, "big") % P, (P - 1) // Q, P)


H_LABEL = b"fedsilo-secagg/1 pedersen H"
# = _hash_to_group(H_LABEL), written out so that importing costs no 2048-bit exponentiation
# (tests/secure_agg/test_range_proof.py recomputes it)
H = int(
    "cfd6afce399d546b61c41c813b3cba939d4f9e2bb85f642131cfe8b53856d41cb1a391f2a0fdd524"
    "b466627596df9352dfeb7c010d931d17c72f0a593af961263adb87011f14dd001dc29e75ea8a5b39"
    "6e8f4b2ebed00532358d9e8c02cd30529b02e5b3c9454990d67ffeba3d059c4eefd603219ad9ca7d"
    "1063e73cefa96a3e2f122a19318c6f917daf237de13daa22e7f7162d3ae2157d73ec3650b9a17bc6"
    "3410753e8cda66dc1d0e322cdd143dd912c61b76e637328918071b08ff4ec6d5b1666c3877934e49"
    "4ff688b98e8087d51a174109b37e9f994576c56a9c2cc3dee96f21e68343e410dd972c1b1364b1a5"
    "b342128ca12394ddc32191784ca5433",
    16,
)


def commit(value: int, blind: int) -> int:
    """Pedersen commitment ``G^value H^blind mod P``."""
    return pow(G, value, P) * pow(H, blind, P) % P


def random_blind() -> int:
    """A uniform exponent in [0, Q)."""
    return secrets.randbelow(Q)


def element_bytes(x: int) -> bytes:
    """A group element as 256 big-endian bytes."""
    return x.to_bytes(_ELEMENT, "big")


def element_from(data: bytes) -> int:
    """A group element from bytes; MalformedMessage unless it lies in the order-Q subgroup."""
    if len(data) != _ELEMENT:
        raise MalformedMessage("a group element must be 256 bytes")
    x = int.from_bytes(data, "big")
    if not 1 < x < P or pow(x, Q, P) != 1:
        raise MalformedMessage("not an element of the commitment group")
    return x


def _challenge(context: bytes, k: int, c: int, a0: int, a1: int) -> int:
    h = hashlib.sha256()
    for part in (context, k.to_bytes(4, "big"), *(element_bytes(v) for v in (c, a0, a1))):
        h.update(len(part).to_bytes(4, "big") + part)
    return int.from_bytes(h.digest(), "big") % Q


def _prove_bits(value: int, blind: int, bits: int, context: bytes) -> bytes:
    """Proof that the commitment ``G^value H^blind`` opens to an integer in [0, 2^bits)."""
    blinds = [random_blind() for _ in range(bits - 1)]
    rest = (blind - sum(r << k for k, r in enumerate(blinds))) % Q
    blinds.append(rest * pow(1 << (bits - 1), -1, Q) % Q)
    g_inv = pow(G, Q - 1, P)
    out = []
    for k in range(bits):
        bit, r = (value >> k) & 1, blinds[k]
        c_k = commit(bit, r)
        ys = (c_k, c_k * g_inv % P)
        c_sim, z_sim, w = random_blind(), random_blind(), random_blind()
        a = [0, 0]
        a[1 - bit] = pow(H, z_sim, P) * pow(ys[1 - bit], Q - c_sim, P) % P
        a[bit] = pow(H, w, P)
        c = _challenge(context, k, c_k, a[0], a[1])
        c_real = (c - c_sim) % Q
        z_real = (w + c_real * r) % Q
        c0, c1 = (c_real, c_sim) if bit == 0 else (c_sim, c_real)
        z0, z1 = (z_real, z_sim) if bit == 0 else (z_sim, z_real)
        out.append(
            element_bytes(c_k) + b"".join(v.to_bytes(_SCALAR, "big") for v in (c0, c1, z0, z1))
        )
    return b"".join(out)


def _verify_bits(commitment: int, proof: bytes, bits: int, context: bytes) -> bool:
    if len(proof) != bits * _BIT_PROOF:
        return False
    g_inv = pow(G, Q - 1, P)
    product = 1
    for k in range(bits):
        part = proof[k * _BIT_PROOF : (k + 1) * _BIT_PROOF]
        try:
            c_k = element_from(part[:_ELEMENT])
        except MalformedMessage:
            return False
        c0, c1, z0, z1 = (
            int.from_bytes(part[_ELEMENT + i * _SCALAR : _ELEMENT + (i + 1) * _SCALAR], "big")
            for i in range(4)
        )
        if max(c0, c1, z0, z1) >= Q:
            return False
        a0 = pow(H, z0, P) * pow(c_k, Q - c0, P) % P
        a1 = pow(H, z1, P) * pow(c_k * g_inv % P, Q - c1, P) % P
        if (c0 + c1) % Q != _challenge(context, k, c_k, a0, a1):
            return False
        product = product * pow(c_k, 1 << k, P) % P
    return product == commitment


def prove_at_most(value: int, blind: int, bound_bits: int, context: bytes) -> bytes:
    """Proof that ``commit(value, blind)`` opens to an integer in ``[0, 2^bound_bits]``."""
    if not 0 <= value <= 1 << bound_bits:
        raise ValueError(f"value {value} is outside [0, 2^{bound_bits}]")
    bits = bound_bits + 1
    low = _prove_bits(value, blind, bits, context + b"|low")
    high = _prove_bits((1 << bound_bits) - value, (-blind) % Q, bits, context + b"|high")
    return low + high


def verify_at_most(commitment: int, proof: bytes, bound_bits: int, context: bytes) -> None:
    """Raise BadSignature unless ``proof`` shows ``commitment`` opens to ``[0, 2^bound_bits]``."""
    bits = bound_bits + 1
    half = bits * _BIT_PROOF
    complement = pow(G, 1 << bound_bits, P) * pow(commitment, Q - 1, P) % P
    if not (
        len(proof) == 2 * half
        and _verify_bits(commitment, proof[:half], bits, context + b"|low")
        and _verify_bits(complement, proof[half:], bits, context + b"|high")
    ):
        raise BadSignature("the weight range proof does not verify")
