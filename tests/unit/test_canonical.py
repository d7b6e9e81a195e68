import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtmerge.canonical import canonical_pack, canonical_unpack, domain_hash
from crdtmerge.errors import InvalidInput

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def test_map_key_order_does_not_change_bytes():
    assert canonical_pack({"b": 1, "a": {"y": 2, "x": 3}}) == canonical_pack(
        {"a": {"x": 3, "y": 2}, "b": 1}
    )


def test_floats_are_always_float64():
    assert canonical_pack(0.5) == b"\xcb" + bytes.fromhex("3fe0000000000000")
    assert canonical_pack(1.0) != canonical_pack(1)


def test_empty_map_is_a_map_not_an_array():
    assert canonical_pack({}) == b"\x80"
    assert canonical_pack({"a": {}}) == bytes.fromhex("81a16180")
    assert canonical_unpack(canonical_pack({"a": {}})) == {"a": {}}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {1: "x"}, object(), 2**64])
def test_values_without_canonical_form_are_rejected(bad):
    with pytest.raises(InvalidInput):
        canonical_pack(bad)


@given(values)
def test_pack_unpack_pack_is_identity(v):
    b = canonical_pack(v)
    assert canonical_pack(canonical_unpack(b)) == b


def test_garbage_is_rejected_on_unpack():
    with pytest.raises(InvalidInput):
        canonical_unpack(b"\xc1")


def test_domain_hash_separates_domains_and_part_boundaries():
    assert domain_hash("a", b"bc") != domain_hash("ab", b"c")
    assert domain_hash("x", b"a", b"b") != domain_hash("x", b"ab")
    assert domain_hash("x", b"a") != domain_hash("y", b"a")
    assert len(domain_hash("x", length=64)) == 64
