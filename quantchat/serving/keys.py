"""Keys and secrets of the fleet: stored hashed, compared in constant time, rotated without a restart.

A ``KeyRing`` is the set of keys one role accepts (the API's client keys, the controller's worker
registration secret, its admin secret). Its file holds one entry a line: a plain key, or
``sha256:<64 hex digits>`` (the key's sha256, from ``quantchat deploy hash-key``); ``#`` starts a
comment. Keys are kept only as sha256 digests. The file is read again when its mtime changes (checked
at most once a second) or on ``reload()`` (SIGHUP); a key that left the file keeps working for
``grace_s`` seconds, so clients can move to the new key while both are accepted.

Keys must be random (``secrets.token_urlsafe(32)``): a plain sha256 is no protection for a guessable
password.

A ``SecretSource`` is the sending side: the one secret a worker or an API server sends, read from a
file (again when it changes) or given as a string.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from quantchat.errors import QuantchatError

HASH_PREFIX = "sha256:"
DEFAULT_GRACE_S = 300.0
POLL_S = 1.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The ``sha256:HEX`` entry of ``key`` for a key file."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_entry(line: str, where: str = "") -> bytes:
    """The sha256 digest of one key-file entry (a plain key or ``sha256:HEX``)."""
    s = line.strip()
    if s.lower().startswith(HASH_PREFIX):
        h = s[len(HASH_PREFIX):].strip().lower()
        if not _HEX64.match(h):
            raise QuantchatError(f"{where}bad hashed key entry (want sha256: and 64 hex digits)")
        return bytes.fromhex(h)
    return hashlib.sha256(s.encode("utf-8")).digest()


def read_entries(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantchatError(f"{path}: cannot read keys ({getattr(e, 'strerror', None) or e})") from None
    return [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]


class KeyRing:
    """The keys a role accepts: fixed ones (flags, environment) plus a reloadable file's."""

    def __init__(self, keys: Iterable[str] = (), path: str | Path | None = None, grace_s: float = DEFAULT_GRACE_S,
                 name: str = "key", clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = lambda s: None, poll_s: float = POLL_S) -> None:
        if grace_s < 0:
            raise QuantchatError("the key grace window must be >= 0 seconds")
        self.name, self.grace_s, self.clock, self.log, self.poll_s = name, grace_s, clock, log, poll_s
        self.fixed = {parse_entry(k) for k in keys if k and k.strip()}
        self.path = Path(path) if path else None
        self.current: set[bytes] = set()
        self.retiring: dict[bytes, float] = {}  # digest -> accepted until (clock)
        self._lock = threading.RLock()  # SIGHUP's reload may run inside check()
        self._mtime: int | None = None
        self._checked = -1e18
        if self.path is not None:
            self.reload(initial=True)

    def __bool__(self) -> bool:
        return bool(self.fixed or self.current or self.retiring)

    def _load(self) -> set[bytes]:
        assert self.path is not None
        entries = read_entries(self.path)
        out = {parse_entry(e, f"{self.path}: line {i + 1}: ") for i, e in enumerate(entries)}
        if not out:
            raise QuantchatError(f"{self.path}: no {self.name} in the file")
        return out

    def reload(self, initial: bool = False) -> bool:
        """Read the file again; keys no longer in it stay valid for the grace window. A file that cannot
        be read (mid-rewrite, removed) keeps the keys as they were; the error is logged (raised at start)."""
        if self.path is None:
            return False
        try:
            new = self._load()
            mtime = self.path.stat().st_mtime_ns
        except (OSError, QuantchatError) as e:
            if initial:
                raise QuantchatError(str(e)) from None
            self.log(f"{self.path}: keeping the current {self.name}s: {e}")
            return False
        now = self.clock()
        with self._lock:
            for d in self.current - new:
                self.retiring[d] = now + self.grace_s
            for d in new:
                self.retiring.pop(d, None)
            changed = new != self.current
            self.current, self._mtime, self._checked = new, mtime, now
        if changed and not initial:
            self.log(f"{self.path}: {len(new)} {self.name}(s) loaded; replaced ones accepted for "
                     f"{self.grace_s:g} s more")
        return changed

    def _maybe_reload(self) -> None:
        if self.path is None or self.clock() - self._checked < self.poll_s:
            return
        self._checked = self.clock()
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self.reload()

    def check(self, given: str | None) -> bool:
        """``given`` is one of the keys (or a replaced one within its grace window); constant time per key."""
        if not given:
            return False
        self._maybe_reload()
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        now = self.clock()
        with self._lock:
            valid = self.fixed | self.current | {d for d, until in self.retiring.items() if now < until}
            for d in [d for d, until in self.retiring.items() if now >= until]:
                del self.retiring[d]
        ok = False
        for d in valid:  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(digest, d)
        return ok


class SecretSource:
    """The secret one process sends (a worker to the controller, an API server to the controller and
    workers): a string, or the first plain entry of a file, read again when the file changes."""

    def __init__(self, value: str | None = None, path: str | Path | None = None, name: str = "secret") -> None:
        self.name, self.path = name, Path(path) if path else None
        self._value = (value or "").strip()
        self._mtime: int | None = None
        if self.path is not None:
            self._read()
        if not self._value:
            raise QuantchatError(f"no {name} given")

    def _read(self) -> None:
        assert self.path is not None
        entries = [e for e in read_entries(self.path) if not e.lower().startswith(HASH_PREFIX)]
        if not entries:
            raise QuantchatError(f"{self.path}: no plain {self.name} in the file (a sender needs the key itself, "
                                 "not its hash)")
        self._value, self._mtime = entries[0], self.path.stat().st_mtime_ns

    def get(self) -> str:
        if self.path is not None:
            try:
                if self.path.stat().st_mtime_ns != self._mtime:
                    self._read()
            except (OSError, QuantchatError):
                pass  # mid-rewrite: keep sending the last good one
        return self._value

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.get()}"}


def install_sighup(rings: Iterable[KeyRing], log: Callable[[str], None]) -> bool:
    """Reload every ring's file on SIGHUP (main thread only; False where there is no SIGHUP)."""
    import signal

    rings = [r for r in rings if r.path is not None]
    if not rings or not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False

    def on_hup(signum, frame) -> None:
        for r in rings:
            r.reload()
        log("SIGHUP: key files read again")

    signal.signal(signal.SIGHUP, on_hup)
    return True

