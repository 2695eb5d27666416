"""One registry idiom for every kind of plug-in (timm's ``register_model`` is the model).

A :class:`Registry` maps names to objects in registration order. Registering is a decorator
(``@REGISTRY.register("name")``) or a call (``REGISTRY.register("name", obj)``); a name taken by
another object is an error unless ``override=True`` (re-importing a module re-registers the
same function, which is allowed). ``get`` of an unknown name raises the registry's error with
the close matches and the listing command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from bob_cache.errors import BobCacheError, did_you_mean

T = TypeVar("T")


class UnknownNameError(BobCacheError, KeyError):
    """A name that a registry does not hold."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Named plug-ins of one kind.

    Args:
        what: what the entries are, for messages ("data source kind").
        hint: the fix appended to an unknown-name message ("See `bob-cache datasets`.").
        error: the error raised for an unknown name (a subclass of :class:`BobCacheError`).
    """

    def __init__(
        self, what: str, *, hint: str = "", error: type[BobCacheError] = UnknownNameError
    ) -> None:
        self.what, self.hint, self.error = what, hint, error
        self._entries: dict[str, T] = {}

    @overload
    def register(
        self, name: str, obj: None = None, *, override: bool = False
    ) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T, *, override: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """Add ``obj`` under ``name`` (or return a decorator that does)."""

        def add(entry: T) -> T:
            old = self._entries.get(name)
            if old is not None and not override and not _same(old, entry):
                raise ValueError(
                    f"{self.what.capitalize()} '{name}' is already registered ({old!r}); "
                    "pick another name or pass override=True."
                )
            self._entries[name] = entry
            return entry

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The entry called ``name``; raises :attr:`error` naming close matches."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            hint = f" {self.hint}" if self.hint else ""
            raise self.error(
                f"Unknown {self.what} '{name}'.{did_you_mean(name, self._entries)} "
                f"Known: {known}.{hint}"
            ) from None

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def values(self) -> list[T]:
        """Registered entries in registration order."""
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def copy(self) -> Registry[T]:
        """A registry with the same settings and entries, independent of this one (tests swap
        it in to register temporary entries)."""
        twin: Registry[T] = Registry(self.what, hint=self.hint, error=self.error)
        twin._entries = dict(self._entries)
        return twin

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def _same(a: Any, b: Any) -> bool:
    """Whether two registrations are one definition: the same object, the same function or
    class re-created by importing its module again, or an instance of such a class with equal
    attributes (``TimmProvider()`` created again)."""
    if a is b or _equal(a, b):
        return True
    if _defined_name(a) is not None or _defined_name(b) is not None:  # functions, classes
        return _defined_name(a) == _defined_name(b)
    if _defined_name(type(a)) != _defined_name(type(b)):
        return False
    return hasattr(a, "__dict__") and hasattr(b, "__dict__") and _equal(vars(a), vars(b))


def _defined_name(obj: Any) -> tuple[str, str] | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return (module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays, whose == is elementwise
        return False
