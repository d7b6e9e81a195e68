import pytest

from crdtmerge.errors import InvalidRecipe
from crdtmerge.recipe import Recipe


def test_round_trip_through_dict_and_json():
    r = Recipe(
        "ties",
        1,
        {"density": [{"filter": "mlp", "value": [0.1, 0.5]}, {"value": 0.3}]},
        base=b"\x01" * 32,
    )
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(r.to_json()) == r
    assert Recipe.from_dict(r.to_json()).hash() == r.hash()


def test_param_order_does_not_change_hash():
    a = Recipe("ties", 1, {"density": 0.5, "lambda": 1.0})
    b = Recipe("ties", 1, {"lambda": 1.0, "density": 0.5})
    assert a.hash() == b.hash()
    assert a == b and hash(a) == hash(b)


def test_every_field_changes_hash():
    base = Recipe("ties", 1, {"density": 0.5}, base=b"\x01" * 32, out_dtype="bfloat16")
    variants = [
        Recipe("dare_ties", 1, {"density": 0.5}, base=b"\x01" * 32, out_dtype="bfloat16"),
        Recipe("ties", 2, {"density": 0.5}, base=b"\x01" * 32, out_dtype="bfloat16"),
        Recipe("ties", 1, {"density": 0.25}, base=b"\x01" * 32, out_dtype="bfloat16"),
        Recipe("ties", 1, {"density": 0.5}, base=b"\x02" * 32, out_dtype="bfloat16"),
        Recipe("ties", 1, {"density": 0.5}, base=b"\x01" * 32, out_dtype="float16"),
        Recipe("ties", 1, {"density": 0.5}, base=None, out_dtype="bfloat16"),
    ]
    hashes = {v.hash() for v in variants}
    assert base.hash() not in hashes and len(hashes) == len(variants)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": ""}, "non-empty string"),
        ({"strategy": "x", "version": 0}, "positive integer"),
        ({"strategy": "x", "base": b"short"}, "32-byte root"),
        ({"strategy": "x", "out_dtype": "int8"}, "out_dtype must be one of"),
        ({"strategy": "x", "params": {"a": float("nan")}}, "no canonical encoding"),
    ],
)
def test_bad_recipes_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(InvalidRecipe, match=message):
        Recipe(**kwargs)


def test_from_dict_rejects_unknown_fields_and_bad_hex():
    with pytest.raises(InvalidRecipe, match="unknown recipe field"):
        Recipe.from_dict({"strategy": "ties", "colour": "red"})
    with pytest.raises(InvalidRecipe, match="not a hex root"):
        Recipe.from_dict({"strategy": "ties", "base": "zz"})
    with pytest.raises(InvalidRecipe, match="missing 'strategy'"):
        Recipe.from_dict({})
