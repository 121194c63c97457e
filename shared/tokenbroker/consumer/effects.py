"""What the core asks its shells to do, and the object that carries one call between them.

The client is written the sans-I/O way (h11, wsproto, hyper-h2: https://sans-io.readthedocs.io/):
the core (:mod:`tokenbroker.consumer.core`) is a generator that decides everything and
*yields* an effect whenever it needs the outside world -- hold a key, get an ID token, send a
request, wait -- and receives the effect's answer. A shell (:mod:`~tokenbroker.consumer.sync`
with threads, :mod:`~tokenbroker.consumer.aio` with asyncio) performs each effect with its own
primitives and hands back the answer, or the exception it raised. That is all a shell does, so
the two shells cannot drift apart: there is one copy of every decision.

Each effect dispatches itself to the matching method of a :class:`Performer` (``perform``),
so neither shell repeats a dispatch on effect types, and a shell that forgets one fails
``mypy``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar, cast

from tokenbroker.consumer.idtoken import IdTokenSource, obtain_id_token
from tokenbroker.consumer.token import TokenKey
from tokenbroker.consumer.wire import NoReply, Reply

T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)
P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)

#: Lets go of a key held by :class:`Claim` (``threading.Lock.release``, ``asyncio.Lock.release``).
Release: TypeAlias = Callable[[], None]


class Performer(Protocol[P_co]):
    """A shell's I/O: one method per effect. The sync shell answers with values (``P_co`` is
    ``object``), the asyncio shell with awaitables of them."""

    def claim(self, effect: Claim, /) -> P_co: ...

    def id_token(self, effect: GetIdToken, /) -> P_co: ...

    def post(self, effect: Post, /) -> P_co: ...

    def sleep(self, effect: Sleep, /) -> P_co: ...


class Effect(ABC, Generic[R_co]):
    """Something the core needs done; ``R_co`` is the type of its answer."""

    @abstractmethod
    def perform(self, io: Performer[P], /) -> P:
        """Ask ``io`` to do this (its answer, or an awaitable of it)."""


@dataclass(frozen=True)
class Claim(Effect[Release | None]):
    """Hold ``key`` for this call: one refresh per key at a time (single flight).

    With ``wait`` the shell waits at most ``timeout`` seconds for the key; without, it answers
    ``None`` at once when another call holds it. Either answers ``None`` if it gave up; else
    the function that lets go of the key, which the core calls when it is done.
    """

    key: TokenKey
    timeout: float
    wait: bool

    def perform(self, io: Performer[P], /) -> P:
        return io.claim(self)


@dataclass(frozen=True)
class GetIdToken(Effect[str]):
    """The caller's ID token from ``source`` (blocking: it may call the metadata server);
    with ``refresh``, a new one (after the broker said ``401``)."""

    source: IdTokenSource
    audience: str
    refresh: bool

    def obtain(self) -> str:
        """The blocking call itself, for the shell to run where blocking is allowed."""
        return obtain_id_token(self.source, self.audience, refresh=self.refresh)

    def perform(self, io: Performer[P], /) -> P:
        return io.id_token(self)


@dataclass(frozen=True)
class Post(Effect[Reply | NoReply]):
    """``POST url``, no redirects, the whole exchange within ``timeout`` seconds. The answer
    is a :class:`Reply` read through a :class:`~tokenbroker.consumer.wire.ReplyBody`, or a
    :class:`NoReply` when the transport failed."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    timeout: float

    def perform(self, io: Performer[P], /) -> P:
        return io.post(self)


@dataclass(frozen=True)
class Sleep(Effect[None]):
    """Wait ``seconds`` on the core's clock (a ``FakeClock`` moves instead of waiting)."""

    seconds: float

    def perform(self, io: Performer[P], /) -> P:
        return io.sleep(self)


#: The core's side of a call: yields effects, receives their answers, returns ``T``.
Steps: TypeAlias = Generator[Effect[object], object, T]


def ask(effect: Effect[T]) -> Steps[T]:
    """``answer = yield from ask(effect)``: yield one effect, typed by its answer."""
    answer = yield effect
    return cast(T, answer)


class Flow(Generic[T]):
    """One call into the core, between its shell's effects.

    ``effect`` is what the core asks for next, ``None`` once it has finished. The shell
    performs it and hands back the answer (:meth:`resolve`) or what it raised (:meth:`fail`:
    thrown into the core at the point that asked, so the core decides -- a cancelled request
    still releases the breaker's trial and the key). When the core raises, :meth:`resolve` or
    :meth:`fail` raises the same; when it returns, :attr:`result` holds its value.
    """

    __slots__ = ("_result", "_steps", "effect")

    def __init__(self, steps: Steps[T] | None) -> None:
        self._steps = steps
        self.effect: Effect[object] | None = None
        self._result: T | None = None
        if steps is not None:
            self._advance(None, None)

    @classmethod
    def finished(cls, result: T) -> Flow[T]:
        """A call the core answered without asking for anything."""
        flow = cls(None)
        flow._result = result
        return flow

    def resolve(self, answer: object) -> None:
        self._advance(answer, None)

    def fail(self, error: BaseException) -> None:
        self._advance(None, error)

    @property
    def result(self) -> T:
        if self.effect is not None:
            raise RuntimeError("the core is still waiting for an effect")
        return cast(T, self._result)

    def _advance(self, answer: object, error: BaseException | None) -> None:
        steps = self._steps
        if steps is None:
            raise RuntimeError("the core has finished")
        try:
            self.effect = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as done:
            self._finish()
            self._result = done.value
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        self._steps = None
        self.effect = None
