"""The console's signed session cookie and CSRF tokens: only this server's secret makes them, they expire, and a
CSRF token is good for its own session alone."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest

from jobs.web.console.session import LOGIN_FORM_SECONDS, SESSION_SECONDS, Signer, token_digest

SECRET = secrets.token_hex(32)
TOKEN = "rpq_" + secrets.token_urlsafe(32)
NOW = 1_900_000_000.0


def test_a_session_cookie_reads_back_as_its_session_and_never_holds_the_token() -> None:
    signer = Signer(SECRET)
    session, cookie = signer.new_session(token_digest(TOKEN), now=NOW)

    assert signer.session(cookie, now=NOW + SESSION_SECONDS - 1) == session
    assert session.token_digest == token_digest(TOKEN)
    assert TOKEN not in cookie and TOKEN not in repr(session) and session.token_digest.hex() not in repr(session)
    assert SECRET not in repr(signer)


def test_a_session_ends_when_it_expires() -> None:
    signer = Signer(SECRET)
    _, cookie = signer.new_session(token_digest(TOKEN), now=NOW)

    assert signer.session(cookie, now=NOW + SESSION_SECONDS) is None


@pytest.mark.parametrize("tamper", [
    lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),    # another signature
    lambda c: "x" + c,                                              # another body, the same signature
    lambda c: c.replace(".", ""),                                   # no signature
    lambda c: c + ".more",
    lambda c: "",
])
def test_an_altered_or_forged_cookie_opens_no_session(tamper: Callable[[str], str]) -> None:
    signer = Signer(SECRET)
    _, cookie = signer.new_session(token_digest(TOKEN), now=NOW)

    assert signer.session(tamper(cookie), now=NOW) is None


def test_a_cookie_signed_under_another_secret_opens_no_session() -> None:
    _, cookie = Signer(secrets.token_hex(32)).new_session(token_digest(TOKEN), now=NOW)

    assert Signer(SECRET).session(cookie, now=NOW) is None


def test_a_login_nonce_cannot_stand_in_for_a_session() -> None:
    signer = Signer(SECRET)
    nonce_cookie, _ = signer.new_login_nonce(now=NOW)

    assert signer.session(nonce_cookie, now=NOW) is None


def test_a_csrf_token_is_good_for_its_own_session_alone() -> None:
    signer = Signer(SECRET)
    mine, _ = signer.new_session(token_digest(TOKEN), now=NOW)
    theirs, _ = signer.new_session(token_digest(TOKEN), now=NOW)

    assert signer.csrf_ok(mine, signer.csrf_token(mine))
    assert not signer.csrf_ok(mine, signer.csrf_token(theirs))
    assert not signer.csrf_ok(mine, "")
    assert not signer.csrf_ok(mine, None)
    assert not Signer(secrets.token_hex(32)).csrf_ok(mine, signer.csrf_token(mine))


def test_a_login_form_token_is_bound_to_its_nonce_cookie_and_expires() -> None:
    signer = Signer(SECRET)
    cookie, token = signer.new_login_nonce(now=NOW)
    _, other_token = signer.new_login_nonce(now=NOW)

    assert signer.login_csrf_ok(cookie, token, now=NOW)
    assert not signer.login_csrf_ok(cookie, other_token, now=NOW)
    assert not signer.login_csrf_ok(None, token, now=NOW)
    assert not signer.login_csrf_ok(cookie, token, now=NOW + LOGIN_FORM_SECONDS)
