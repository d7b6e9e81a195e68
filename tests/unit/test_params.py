import pytest

from crdtmerge.errors import InvalidRecipe
from crdtmerge.params import check_param_value, layer_index, resolve_param
from crdtmerge.strategies.base import REQUIRED, ParamSpec

DENSITY = ParamSpec("density", float, 1.0, minimum=0.0, maximum=1.0)
T = ParamSpec("t", float, REQUIRED)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("0.weight", 0),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.layers12.weight", None),
    ],
)
def test_layer_index(name, layer):
    assert layer_index(name) == layer


def test_scalar_is_coerced_and_range_checked():
    assert check_param_value(DENSITY, 1) == 1.0
    with pytest.raises(InvalidRecipe, match=r"'density' must be <= 1.0, got 1.5"):
        check_param_value(DENSITY, 1.5)
    with pytest.raises(InvalidRecipe, match="must be a number"):
        check_param_value(DENSITY, "high")
    with pytest.raises(InvalidRecipe, match="must be a number"):
        check_param_value(DENSITY, True)


def test_gradient_interpolates_over_layers():
    grad = check_param_value(T, [0.0, 1.0])
    assert resolve_param(T, grad, "model.layers.0.w", 5) == 0.0
    assert resolve_param(T, grad, "model.layers.2.w", 5) == 0.5
    assert resolve_param(T, grad, "model.layers.4.w", 5) == 1.0
    # a non-layer tensor takes the first value
    assert resolve_param(T, grad, "lm_head.weight", 5) == 0.0
    three = check_param_value(T, [0.0, 1.0, 0.0])
    assert resolve_param(T, three, "model.layers.2.w", 5) == 1.0
    assert resolve_param(T, three, "model.layers.3.w", 5) == 0.5


def test_filter_list_first_match_wins_and_default_applies():
    v = check_param_value(
        DENSITY, [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.1, 0.9]}]
    )
    assert resolve_param(DENSITY, v, "model.layers.0.self_attn.q.weight", 2) == 0.3
    assert resolve_param(DENSITY, v, "model.layers.1.mlp.up.weight", 2) == 0.9
    assert resolve_param(DENSITY, v, "model.norm.weight", 2) == 1.0  # the default
    with pytest.raises(InvalidRecipe, match="no filter entry matches"):
        resolve_param(T, check_param_value(T, [{"filter": "x", "value": 1.0}]), "y", 1)


def test_bad_filter_entries_are_rejected():
    with pytest.raises(InvalidRecipe, match="filter entries are"):
        check_param_value(DENSITY, [{"filter": "a", "val": 1}])
    with pytest.raises(InvalidRecipe, match=r"\[0\].value"):
        check_param_value(DENSITY, [{"filter": "a", "value": 7}])
    with pytest.raises(InvalidRecipe, match="at least one value"):
        check_param_value(DENSITY, [])
