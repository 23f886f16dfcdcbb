"""Pedersen commitments and the [0, 2^L] range proof (small L: each bit costs a few modexps)."""

from __future__ import annotations

import pytest

from secure_agg import range_proof as rp
from secure_agg.errors import BadSignature, MalformedMessage

L = 4


@pytest.mark.parametrize("value", [0, 1, 7, 1 << L])
def test_values_in_range_prove_and_verify(value: int) -> None:
    blind = rp.random_blind()
    proof = rp.prove_at_most(value, blind, L, b"ctx")
    rp.verify_at_most(rp.commit(value, blind), proof, L, b"ctx")


def test_values_out_of_range_cannot_be_proven() -> None:
    for value in (-1, (1 << L) + 1):
        with pytest.raises(ValueError, match="outside"):
            rp.prove_at_most(value, rp.random_blind(), L, b"ctx")


def test_a_proof_binds_its_commitment_context_and_bytes() -> None:
    blind = rp.random_blind()
    commitment = rp.commit(5, blind)
    proof = rp.prove_at_most(5, blind, L, b"ctx")
    with pytest.raises(BadSignature):
        rp.verify_at_most(rp.commit(6, blind), proof, L, b"ctx")  # other value
    with pytest.raises(BadSignature):
        rp.verify_at_most(commitment, proof, L, b"other silo")  # replayed elsewhere
    with pytest.raises(BadSignature):
        rp.verify_at_most(commitment, proof[:-1], L, b"ctx")  # truncated
    flipped = bytearray(proof)
    flipped[300] ^= 1
    with pytest.raises(BadSignature):
        rp.verify_at_most(commitment, bytes(flipped), L, b"ctx")
    # a commitment to 2^L + 3 with the (valid) proof of another one never verifies
    with pytest.raises(BadSignature):
        rp.verify_at_most(rp.commit((1 << L) + 3, blind), proof, L, b"ctx")


def test_commitments_add_up() -> None:
    a, b = rp.random_blind(), rp.random_blind()
    assert rp.commit(3, a) * rp.commit(4, b) % rp.P == rp.commit(7, a + b)


def test_group_elements_are_checked() -> None:
    for bad in (bytes(256), (1).to_bytes(256, "big"), (2).to_bytes(256, "big"), b"\x01" * 10):
        with pytest.raises(MalformedMessage):
            rp.element_from(bad)
    assert rp.element_from(rp.element_bytes(rp.H)) == rp.H


def test_h_is_hashed_into_the_group() -> None:
    assert rp._hash_to_group(rp.H_LABEL) == rp.H
    assert rp.H not in (0, 1) and pow(rp.H, rp.Q, rp.P) == 1
