"""Join laws of the layer-1 CRDTs, on states reached by running operations.

For every type (OR-Set, LWW register, merge document, node state) and reachable a, b, c:

* commutative:  a ⊔ b = b ⊔ a
* associative:  (a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)
* idempotent:   a ⊔ a = a
* inflationary: a ≤ a ⊔ b and b ≤ a ⊔ b, for the lattice order written out independently below
* least upper bound: a ≤ b exactly when a ⊔ b = b

plus: join never mutates its inputs, and the encoding round-trips to identical bytes.
"""

from __future__ import annotations

from hypothesis import given

from crdtmerge.crdt import LWWRegister, MergeDocument, NodeState, ORSet
from tests.property.crdt_programs import MERGES, documents, node_states


def orset_leq(a: ORSet, b: ORSet) -> bool:
    """a ≤ b: b has seen every dot a has seen, and holds exactly a's dots among those."""
    if not a.clock <= b.clock:
        return False
    for element in b.value():
        for dot in b.dots(element):
            if a.clock.contains(dot) and dot not in a.dots(element):
                return False
    for element in a.value():
        for dot in a.dots(element):
            if dot not in b.dots(element) and not b.clock.contains(dot):
                return False
    return True


def lww_leq(a: LWWRegister, b: LWWRegister) -> bool:
    return a.key() <= b.key()


def doc_leq(a: MergeDocument, b: MergeDocument) -> bool:
    return (
        lww_leq(a.recipe, b.recipe)
        and orset_leq(a.contributions, b.contributions)
        and orset_leq(a.trusted_keys, b.trusted_keys)
    )


def state_leq(a: NodeState, b: NodeState) -> bool:
    return all(doc_leq(a.get(n), b.get(n)) for n in set(a.names()) | set(b.names()))


def _parts(docs: list[MergeDocument]) -> dict[str, list]:
    return {
        "orset": [d.contributions for d in docs],
        "keys": [d.trusted_keys for d in docs],
        "lww": [d.recipe for d in docs],
        "document": docs,
    }


LEQ = {"orset": orset_leq, "keys": orset_leq, "lww": lww_leq, "document": doc_leq}


@given(documents())
def test_join_is_commutative(docs):
    # a ⊔ b = b ⊔ a, for each component and for the product
    for name, (a, b, _) in _parts(docs).items():
        assert a.join(b) == b.join(a), name
        assert a.join(b).to_bytes() == b.join(a).to_bytes(), name


@given(documents())
def test_join_is_associative(docs):
    # (a ⊔ b) ⊔ c = a ⊔ (b ⊔ c); values are immutable, so both sides are distinct objects
    for name, (a, b, c) in _parts(docs).items():
        left = a.join(b).join(c)
        right = a.join(b.join(c))
        assert left == right, name
        assert left.to_bytes() == right.to_bytes(), name


@given(documents(count=1))
def test_join_is_idempotent(docs):
    # a ⊔ a = a, also against an equal copy that is a different object
    for name, (a,) in _parts(docs).items():
        copy = type(a).from_bytes(a.to_bytes())
        assert copy is not a
        assert a.join(a) == a, name
        assert a.join(copy) == a and copy.join(a) == a, name


@given(documents(count=2))
def test_join_is_inflationary(docs):
    # a ≤ a ⊔ b and b ≤ a ⊔ b
    for name, (a, b) in _parts(docs).items():
        j = a.join(b)
        assert LEQ[name](a, j), name
        assert LEQ[name](b, j), name


@given(documents(count=2))
def test_join_is_the_least_upper_bound_of_the_order(docs):
    # a ≤ b  ⟺  a ⊔ b = b
    for name, (a, b) in _parts(docs).items():
        assert LEQ[name](a, b) == (a.join(b) == b), name


@given(node_states())
def test_node_state_join_is_commutative_associative_idempotent(states):
    a, b, c = states
    assert a.join(b) == b.join(a)
    assert a.join(b).join(c) == a.join(b.join(c))
    assert a.join(a) == a
    assert state_leq(a, a.join(b)) and state_leq(b, a.join(b))


@given(node_states())
def test_join_never_mutates_its_inputs(states):
    before = [s.to_bytes() for s in states]
    a, b, c = states
    a.join(b).join(c)
    c.join(b)
    for m in MERGES:
        a.get(m).contributions.join(c.get(m).contributions)
        b.get(m).recipe.join(a.get(m).recipe)
    assert [s.to_bytes() for s in states] == before


@given(node_states())
def test_encoding_round_trip_is_identity(states):
    for s in states:
        data = s.to_bytes()
        back = NodeState.from_bytes(data)
        assert back == s
        assert back.to_bytes() == data
        for m in MERGES:
            doc = s.get(m)
            assert MergeDocument.from_bytes(doc.to_bytes()).to_bytes() == doc.to_bytes()
            assert ORSet.from_bytes(doc.contributions.to_bytes()) == doc.contributions
            assert LWWRegister.from_bytes(doc.recipe.to_bytes()) == doc.recipe


@given(node_states())
def test_reachable_states_are_well_formed(states):
    for s in states:
        s.check_invariants()
    a, b, c = states
    a.join(b).join(c).check_invariants()


@given(documents(count=2))
def test_equal_digests_follow_from_equal_value(docs):
    # the digest is a function of (recipe, live roots, live trusted keys) only
    a, b = docs
    same_value = (
        a.recipe.value == b.recipe.value
        and a.live_roots() == b.live_roots()
        and a.live_keys() == b.live_keys()
    )
    assert (a.digest() == b.digest()) == same_value


@given(node_states(count=2))
def test_join_result_is_independent_of_object_identity(states):
    # joining with a decoded copy gives the same bytes as joining with the original
    a, b = states
    b_copy = NodeState.from_bytes(b.to_bytes())
    assert a.join(b).to_bytes() == a.join(b_copy).to_bytes()
