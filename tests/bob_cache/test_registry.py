"""The shared registry idiom: register, look up, refuse a clash, name close matches."""

from __future__ import annotations

import pytest

from bob_cache.errors import BobCacheError
from bob_cache.registry import Registry, UnknownNameError


def test_register_as_decorator_and_call_keeps_order() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("alpha")
    def alpha() -> int:
        return 1

    reg.register("beta", 2)
    assert reg.names() == ["alpha", "beta"] and list(reg) == ["alpha", "beta"]
    assert reg.get("alpha") is alpha and reg.get("beta") == 2
    assert "beta" in reg and "gamma" not in reg and len(reg) == 2


def test_unknown_name_names_close_matches_and_the_hint() -> None:
    reg: Registry[int] = Registry("widget", hint="See `bob-cache widgets`.")
    reg.register("resnet50", 1)
    with pytest.raises(UnknownNameError) as info:
        reg.get("resnt50")
    message = str(info.value)
    assert "Unknown widget 'resnt50'" in message and "Did you mean 'resnet50'" in message
    assert message.endswith("See `bob-cache widgets`.")
    assert isinstance(info.value, KeyError) and isinstance(info.value, BobCacheError)


def test_custom_error_class() -> None:
    class NoSuchThing(BobCacheError, LookupError):
        pass

    reg: Registry[int] = Registry("thing", error=NoSuchThing)
    with pytest.raises(NoSuchThing, match="Known: none"):
        reg.get("x")


def test_a_clash_is_refused_unless_overridden_but_reimport_is_allowed() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    reg.register("a", 2, override=True)
    assert reg.get("a") == 2

    def make() -> object:
        def f() -> None:  # the same definition created again, as a re-imported module does
            return None

        return f

    reg.register("f", make())
    reg.register("f", make())  # no error
    assert callable(reg.get("f"))


def test_an_instance_made_again_is_the_same_definition_but_other_state_clashes() -> None:
    class Provider:
        def __init__(self, size: int = 1) -> None:
            self.size = size

    reg: Registry[Provider] = Registry("provider")
    first = reg.register("p", Provider())
    reg.register("p", Provider())  # the same class, the same attributes: no error
    assert reg.get("p") is not first
    with pytest.raises(ValueError, match="Provider 'p' is already registered"):
        reg.register("p", Provider(size=2))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("p", object())


def test_values_and_an_independent_copy() -> None:
    reg: Registry[int] = Registry("widget", hint="See `bob-cache widgets`.")
    reg.register("a", 1)
    reg.register("b", 2)
    assert reg.values() == [1, 2] and reg.items() == [("a", 1), ("b", 2)]
    twin = reg.copy()
    twin.register("c", 3)
    twin.register("a", 10, override=True)
    assert reg.names() == ["a", "b"] and reg.get("a") == 1
    assert twin.names() == ["a", "b", "c"] and twin.get("a") == 10
    with pytest.raises(UnknownNameError, match="See `bob-cache widgets`"):
        twin.get("z")
