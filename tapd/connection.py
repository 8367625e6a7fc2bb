"""One client connection's state, with no I/O: bytes and fds in, requests out.

What the daemon must remember between two reads of a connection is pure
bookkeeping, kept here the way h11's ``Connection`` keeps it, so that it is
tested by feeding it and fuzzed, with no socket and no clock:

* which fds belong to which line: the line that holds the last byte of the
  read they came with.  The kernel ends a read of a stream socket right after
  the message that carried fds, but glues messages without fds before it
  (``unix_stream_read_generic``): a client that pipelines a line without fds
  and then one with fds may have both arrive in one read, fds and all, and
  those fds are the second line's.  (:mod:`tapd.scm` sends every fd of a line
  before its newline, so they never come after it.)
* the limits on those fds: a message the kernel truncated (``MSG_CTRUNC``),
  more than one request may bring, more than one uid or all clients together
  may leave waiting in tapd (:class:`FdBudget`, shared by every connection);
* the deadlines: a whole request within ``request_timeout`` (a client that
  trickles one byte at a time cannot hold a connection for ever), and the
  connection's end at ``connection_lifetime``, however busy it is.

Time comes in as numbers (the caller's clock, in seconds).  The rules:

1. :meth:`Connection.receive` takes what one read brought.  It raises
   :class:`~tapd.errors.FdsRefused` or :class:`~tapd.errors.TooManyFds` when
   the fds cannot be kept; the fds it took count against the budget either way.
2. :meth:`Connection.next_request` gives each complete line with its fds, or
   raises :class:`~tapd.errors.LineTooLong`.  The fds it gives are the
   caller's to let go of, and still count until it calls :meth:`FdBudget.release`.
3. :meth:`Connection.answered` starts the next request's deadline, or says the
   connection has outlived its lifetime; :meth:`Connection.timeout` says which
   deadline passed.
4. After any refusal or timeout the connection is over: the caller sends the
   error, lets go of :meth:`Connection.close`'s fds and closes the socket.
"""

from __future__ import annotations

from collections import Counter

from .errors import FdsRefused, RequestTimeout, TooManyFds
from .models import MAX_TAP_QUEUES
from .scm import MAX_FDS_PER_MSG
from .wire import MAX_LINE, LineBuffer

__all__ = ["MAX_FDS_PER_REQUEST", "Connection", "FdBudget"]

#: the most fds one request line may bring: a full set of tap queues and as
#: many vhost fds.  More is refused before it can fill tapd's fd table.
MAX_FDS_PER_REQUEST = 2 * MAX_TAP_QUEUES


class FdBudget:
    """fds received from clients and not yet let go, over every connection.

    ``limit`` is the most tapd holds that way (the server makes it a quarter
    of its open-file limit, so that clients parking fds cannot starve the
    taps and pidfds of the rest); each uid is also held to a limit of its own,
    so that one uid parking fds on lines it never finishes cannot use up the
    whole budget.
    """

    __slots__ = ("_per_uid", "held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._per_uid: Counter[int] = Counter()

    def of(self, uid: int) -> int:
        """fds ``uid`` has waiting in tapd."""
        return self._per_uid.get(uid, 0)

    def hold(self, uid: int, count: int) -> None:
        if count:
            self.held += count
            self._per_uid[uid] += count

    def release(self, uid: int, count: int) -> None:
        if count:
            self.held -= count
            self._per_uid[uid] -= count
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    def refusal(self, uid: int, per_uid: int) -> TooManyFds | None:
        """Why ``uid`` may not keep what it sent, if the budget is overdrawn."""
        held_by_uid = self._per_uid.get(uid, 0)
        if held_by_uid > per_uid:
            return TooManyFds(
                f"uid {uid} has {held_by_uid} file descriptors waiting in "
                f"tapd on requests not yet complete, more than one uid may "
                f"(server.max_fds_per_uid = {per_uid}); none were kept"
            )
        if self.held > self.limit:
            return TooManyFds(
                "tapd holds as many file descriptors from clients as it takes; "
                "none were kept; try again shortly"
            )
        return None


class Connection:
    """The framing, fd and deadline state of one connection from ``uid``."""

    __slots__ = (
        "_budget",
        "_fed",
        "_lines",
        "_max_fds",
        "_taken",
        "_uid",
        "_waiting",
        "deadline",
        "end_of_life",
        "handled",
        "lifetime",
        "request_timeout",
    )

    def __init__(
        self,
        uid: int,
        budget: FdBudget,
        *,
        now: float,
        request_timeout: float,
        lifetime: float,
        max_line: int = MAX_LINE,
        max_fds: int = MAX_FDS_PER_REQUEST,
    ) -> None:
        self._uid = uid
        self._budget = budget
        self._lines = LineBuffer(max_line)
        self._max_fds = max_fds
        # bytes fed so far, and bytes given out as lines (with their newlines)
        self._fed = 0
        self._taken = 0
        # fds not yet given out, each with the stream offset of the line they
        # belong to (that of the last byte of the read they came with)
        self._waiting: list[tuple[int, list[int]]] = []
        self.request_timeout = request_timeout
        self.lifetime = lifetime
        #: when the connection ends, however busy
        self.end_of_life = now + lifetime
        #: when the request being read must be complete (it covers the whole
        #: request, not each read)
        self.deadline = min(now + request_timeout, self.end_of_life)
        #: lines given out so far; the n-th is request n of this connection
        self.handled = 0

    @property
    def pending_fds(self) -> int:
        """fds held for lines not yet given out."""
        return sum(len(fds) for _, fds in self._waiting)

    def receive(
        self,
        data: bytes,
        fds: list[int],
        truncated: bool,
        *,
        max_fds_per_uid: int,
        accept_fds: bool = True,
    ) -> None:
        """Take one read: ``data``, the ``fds`` that came with it, and whether
        the kernel dropped fds for lack of room (``MSG_CTRUNC``).

        ``accept_fds`` False refuses any fds (the caller could not let go of
        them now).  Every fd taken stays this connection's until a line or
        :meth:`close` gives it back, refused or not.
        """
        if fds:
            # fds come with at least one byte; a read of none (impossible on a
            # stream socket) would leave them to the next line.
            self._waiting.append((self._fed + max(len(data), 1) - 1, fds))
            self._budget.hold(self._uid, len(fds))
            if not accept_fds:
                raise FdsRefused(
                    "tapd takes no file descriptors right now: its closers are "
                    "stuck on ones a client sent (the administrator has been "
                    "told who); send the request without fds, or try again later"
                ).about(fds=len(fds))
        refusal: TooManyFds | None
        pending = self.pending_fds
        if truncated or pending > self._max_fds:
            refusal = TooManyFds(
                f"too many file descriptors: one message carries at most "
                f"{MAX_FDS_PER_MSG} and one request at most "
                f"{self._max_fds}; none were kept"
            )
        else:
            refusal = self._budget.refusal(self._uid, max_fds_per_uid)
        if refusal is not None:
            raise refusal.about(
                fds=pending,
                uid_fds=self._budget.of(self._uid),
                held_fds=self._budget.held,
            )
        self._lines.feed(data)
        self._fed += len(data)

    def next_request(self) -> tuple[bytes, list[int]] | None:
        """The next complete line (without its newline) and the fds that came
        with it, or None until more arrives.  Raises
        :class:`~tapd.errors.LineTooLong`."""
        line = self._lines.next_line()
        if line is None:
            return None
        self.handled += 1
        newline = self._taken + len(line)
        self._taken = newline + 1
        fds: list[int] = []
        while self._waiting and self._waiting[0][0] <= newline:
            fds += self._waiting.pop(0)[1]
        return line, fds

    def answered(self, now: float) -> RequestTimeout | None:
        """A request was answered at ``now``: the next one has until the new
        deadline, unless the connection has lived its lifetime (then the
        timeout to close it with)."""
        if now >= self.end_of_life:
            return self.timeout(now)
        self.deadline = min(now + self.request_timeout, self.end_of_life)
        return None

    def timeout(self, now: float) -> RequestTimeout:
        """The deadline passed at ``now``: which one, as the error to send."""
        if now >= self.end_of_life:
            timeout = RequestTimeout(
                f"this connection has been open {self.lifetime:g} s, the most tapd allows "
                "(server.connection_lifetime); closing it: connect again"
            )
            timeout.about(lifetime=self.lifetime)
        else:
            timeout = RequestTimeout(
                f"no complete request within {self.request_timeout:g} s; closing the connection"
            )
            timeout.about(seconds=self.request_timeout)
        return timeout

    def close(self) -> list[int]:
        """The fds of lines never given out, for the caller to let go of."""
        fds = [fd for _, group in self._waiting for fd in group]
        self._waiting = []
        return fds
