"""RPQ_API_TOKENS entries: what each one grants, and every malformed one reported at once, never quoted."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from jobs.cli import main
from jobs.errors import ConfigError
from jobs.settings import Settings
from jobs.web.auth import ADMIN, ADMIN_GRANT, SCOPES, TENANT_SCOPES, Grant, Tokens, entry_for, new_token

CANARY = "canary" + secrets.token_hex(8)


def digest_entry(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_a_bare_sha256_or_plain_entry_is_an_admin_token_as_every_token_was_before_tenants() -> None:
    hashed, _ = new_token()
    plain = "plain-" + secrets.token_hex(8)

    tokens = Tokens.configure([digest_entry(hashed), plain], allow_no_auth=False)

    assert tokens.grant_for(hashed) == ADMIN_GRANT and tokens.grant_for(plain) == ADMIN_GRANT
    assert ADMIN_GRANT.admin and ADMIN_GRANT.sees is None
    assert ADMIN_GRANT.may_use("abc123def", ["tts"])  # a bare RunPod endpoint id


def test_an_entry_with_a_tenant_grants_that_tenant_its_scopes_and_endpoints() -> None:
    shop, app, both = (new_token()[0] for _ in range(3))
    tokens = Tokens.configure(
        f"tenant=shop;scope=submit+read;endpoints=tts+export;{digest_entry(shop)},"
        f" tenant=app; {digest_entry(app)}\n tenant=ops;scope=admin;{both}",
        allow_no_auth=False, endpoints=["tts", "export", "other"])

    shop_grant, app_grant, ops_grant = (tokens.grant_for(t) for t in (shop, app, both))
    assert shop_grant == Grant("shop", frozenset({"submit", "read"}), frozenset({"tts", "export"}))
    assert app_grant == Grant("app", TENANT_SCOPES)  # no scope named: everything on its own jobs
    assert ops_grant is not None and ops_grant.admin and ops_grant.sees is None and ops_grant.tenant == "ops"
    assert shop_grant.sees == "shop" and not shop_grant.allows("cancel") and shop_grant.allows("read")
    assert shop_grant.may_use("tts", ["tts", "export", "other"])
    assert not shop_grant.may_use("other", ["tts", "export", "other"])
    assert app_grant.may_use("other", ["tts", "other"]) and not app_grant.may_use("abc123def", ["tts"])
    assert tokens.grant_for(new_token()[0]) is None and tokens.grant_for(None) is None


def test_every_malformed_entry_is_reported_at_once_and_none_is_quoted() -> None:
    good = digest_entry(new_token()[0])
    entries = [
        f"sha256:{CANARY}",                                  # 1: not a digest
        f"tenant=shop;scope=read+{CANARY};{good}",           # 2: unknown scope
        f"{CANARY};{good}",                                  # 3: an attribute that is not NAME=VALUE
        f"scope=read;{digest_entry(CANARY)}",                # 4: no tenant without admin
        f"tenant={CANARY} x;{digest_entry(CANARY + '1')}",   # 5: a bad tenant name
        f"tenant=a;scope=admin;endpoints=tts;{digest_entry(CANARY + '2')}",  # 6: admin with an allow-list
        f"tenant=a;endpoints=nope;{digest_entry(CANARY + '3')}",             # 7: an endpoint not configured
        f"tenant=a;tenant=b;{digest_entry(CANARY + '4')}",   # 8: given twice
        "tenant=a;",                                         # 9: no token
        good,                                                # 10
        f"tenant=b;{good}",                                  # 11: the same token twice
    ]

    with pytest.raises(ConfigError) as caught:
        Tokens.configure(entries, allow_no_auth=False, endpoints=["tts"])

    problems = caught.value.problems
    assert sorted({int(p.split(":")[1].split()[1]) for p in problems}) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert all(p.startswith("RPQ_API_TOKENS: entry ") for p in problems)
    assert CANARY not in str(caught.value) and good.removeprefix("sha256:") not in str(caught.value)


tenants = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
endpoint_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True)


@given(tenant=tenants, scopes=st.sets(st.sampled_from([s for s in SCOPES if s != ADMIN]), min_size=1),
       endpoints=st.lists(endpoint_names, max_size=4, unique=True))
def test_an_entry_made_by_entry_for_grants_exactly_what_it_was_made_with(
    tenant: str, scopes: set[str], endpoints: list[str]
) -> None:
    token, line = new_token()

    entry = entry_for(line, tenant=tenant, scopes=sorted(scopes), endpoints=endpoints)
    tokens = Tokens.configure([entry], allow_no_auth=False, endpoints=endpoints)

    assert tokens.grant_for(token) == Grant(tenant, frozenset(scopes), frozenset(endpoints) if endpoints else None)
    assert token not in entry


@given(junk=st.text(st.characters(blacklist_characters=",\n;", blacklist_categories=("Cs",)), min_size=1))
def test_a_malformed_attribute_never_brings_its_text_into_the_error(junk: str) -> None:
    secret = CANARY + junk
    with pytest.raises(ConfigError) as caught:
        Tokens.configure([f"{secret};{secret}"], allow_no_auth=False)

    assert secret not in str(caught.value)


def test_tenant_limits_and_metadata_keys_are_read_and_each_bad_one_reported() -> None:
    settings = Settings.from_env({"RPQ_TENANT_MAX_IN_FLIGHT": "shop=100, *=20",
                                  "RPQ_TENANT_SUBMITS_PER_MINUTE": "shop=600", "RPQ_METADATA_INDEX": "user, org"})
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RPQ_TENANT_MAX_IN_FLIGHT": "shop=0,a b=3,shop=2", "RPQ_METADATA_INDEX": "user,a.b,user"})

    assert settings.tenant_max_in_flight == {"shop": 100, "*": 20}
    assert settings.tenant_submits_per_minute == {"shop": 600}
    assert settings.metadata_index == ("user", "org")
    assert len(caught.value.problems) == 4


def test_rpq_api_token_prints_a_token_and_the_entry_that_grants_what_was_asked() -> None:
    made = CliRunner().invoke(main, ["api", "token", "--tenant", "shop", "--scope", "submit+read",
                                     "--endpoints", "tts,export"])
    admin = CliRunner().invoke(main, ["api", "token"])
    refused = CliRunner().invoke(main, ["api", "token", "--scope", "read"])

    token = made.output.splitlines()[0].rpartition(" ")[2]
    entry = made.output.splitlines()[1].rpartition(" ")[2]
    grant = Tokens.configure([entry], allow_no_auth=False).grant_for(token)
    assert made.exit_code == 0 and grant == Grant("shop", frozenset({"submit", "read"}), frozenset({"tts", "export"}))
    assert admin.exit_code == 0 and admin.output.splitlines()[1].rpartition(" ")[2].startswith("sha256:")
    assert refused.exit_code == 2 and "needs a tenant" in refused.output
