"""Shamir, PRG, identity keys and roster."""

from __future__ import annotations

import itertools
import os
import stat

import numpy as np
import pytest

from secure_agg import shamir
from secure_agg.errors import (
    BadSignature,
    BelowThreshold,
    ConfigurationError,
    MalformedMessage,
    UnknownPeer,
)
from secure_agg.keys import IdentityKey, Roster, derive
from secure_agg.messages import pack, unpack
from secure_agg.prg import MaskAccumulator, expand


@pytest.mark.parametrize(("t", "n"), [(3, 3), (3, 5), (4, 6)])
def test_shamir_any_t_shares_rebuild(t: int, n: int) -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    for subset in itertools.combinations(shares.values(), t):
        assert shamir.combine(list(subset), t) == secret
    with pytest.raises(BelowThreshold):
        shamir.combine(list(shares.values())[: t - 1], t)
    # t-1 shares interpolated as if they were enough give an unrelated value
    sub = list(shares.values())[: t - 1]
    with pytest.raises((MalformedMessage, AssertionError)):
        assert shamir.combine(sub, t - 1) == secret


def test_shamir_rejects_corrupt_share() -> None:
    shares = list(shamir.split(b"\x01" * 32, 3, [1, 2, 3]).values())
    with pytest.raises(MalformedMessage):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(MalformedMessage):
        shamir.combine([b"x" * 5, shares[1], shares[2]], 3)


def test_prg_deterministic_and_seed_sensitive() -> None:
    s = os.urandom(32)
    a = expand(s, 100_003)
    assert a.dtype == np.uint32
    np.testing.assert_array_equal(a, expand(s, 100_003))
    np.testing.assert_array_equal(a[:1000], expand(s, 1000))  # prefix-stable
    s2 = bytes([s[0] ^ 1]) + s[1:]
    assert np.count_nonzero(a == expand(s2, 100_003)) < 10
    r1, r2 = derive(s, "self-mask", "run", 1, "a"), derive(s, "self-mask", "run", 2, "a")
    assert r1 != r2 and derive(s, "self-mask", "run2", 1, "a") != r1
    assert np.count_nonzero(expand(r1, 1000) == expand(r2, 1000)) < 3
    # roughly uniform
    assert abs(a.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    a64 = expand(s, 10, np.uint64)
    np.testing.assert_array_equal(a64.view(np.uint32), a[:20])


def test_mask_accumulator_add_then_subtract_cancels() -> None:
    acc = np.arange(300_000, dtype=np.uint32)
    seeds = [os.urandom(32) for _ in range(3)]
    m = MaskAccumulator(np.uint32, chunk_bytes=4096)
    m.apply(acc, plus=seeds[:2], minus=seeds[2:])
    assert not np.array_equal(acc, np.arange(300_000, dtype=np.uint32))
    m.apply(acc, plus=seeds[2:], minus=seeds[:2])
    np.testing.assert_array_equal(acc, np.arange(300_000, dtype=np.uint32))


def test_identity_save_load_perms_and_fingerprint(tmp_path) -> None:
    key = IdentityKey.generate()
    p = tmp_path / "home" / "identity.pem"
    key.save(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    again = IdentityKey.load(p)
    assert again.public_bytes == key.public_bytes
    fp = key.fingerprint()
    assert len(fp.split(" ")) == 8 and all(len(g) == 4 for g in fp.split(" "))
    os.chmod(p, 0o644)
    with pytest.raises(ConfigurationError, match="0600"):
        IdentityKey.load(p)


def test_roster_round_trip_and_verify(tmp_path) -> None:
    a, b = IdentityKey.generate(), IdentityKey.generate()
    r = Roster({"hosp-a": a.public_bytes, "hosp-b": b.public_bytes})
    p = tmp_path / "roster.json"
    r.save(p)
    r2 = Roster.load(p)
    assert dict(r2) == dict(r) and list(r2) == ["hosp-a", "hosp-b"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp left
    sig = a.sign(b"hello")
    r2.verify("hosp-a", b"hello", sig)
    with pytest.raises(BadSignature, match="hosp-b"):
        r2.verify("hosp-b", b"hello", sig)
    with pytest.raises(UnknownPeer, match="mallory"):
        r2.verify("mallory", b"hello", sig)
    with pytest.raises(ConfigurationError):
        Roster.from_json('{"version": 1, "silos": {"x": {"ed25519": "!!"}}}')
    with pytest.raises(ConfigurationError):
        Roster({"bad name": a.public_bytes})


def test_pack_unpack_round_trip_and_garbage() -> None:
    msg = {
        "s": "x",
        "i": -3,
        "b": b"\x00\x01",
        "ls": ["a", "b"],
        "lb": [b"1"],
        "arr": np.arange(5, dtype=np.uint32),
        "empty": [],
    }
    out = unpack(pack(msg))
    assert out["arr"].dtype == np.uint32
    np.testing.assert_array_equal(out.pop("arr"), msg.pop("arr"))
    out["empty"] = []
    assert out == msg
    for junk in (b"", b"FSA1", b"nope" * 4, pack(msg)[:-1], pack(msg) + b"x"):
        with pytest.raises(MalformedMessage):
            unpack(junk)
    with pytest.raises(MalformedMessage):
        pack({"x": 1.5})
