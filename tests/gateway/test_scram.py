"""The server side of SCRAM-SHA-256: RFC 7677's vector, Postgres's own verifiers, the
shapes libpq sends, and every way an exchange must fail."""

from __future__ import annotations

import base64

import psycopg
import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.gateway.scram import ScramError, ScramExchange, Verifier, fake_verifier, make_verifier
from tests.gateway.conftest import superuser_dsn

RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def rfc_verifier() -> Verifier:
    salt, stored, server, iterations = scramp.ScramMechanism().make_auth_info("pencil", salt=RFC_SALT)
    return Verifier(salt, iterations, stored, server)


def run_exchange(verifier, password, *, username="", gs2="n,,", valid=True, tamper=lambda final: final):
    """A client (scramp's, with libpq's empty username) against our server."""
    # With a channel binding but a mechanism without one, scramp's gs2 flag is "y".
    binding = ("tls-server-end-point", b"cert-hash") if gs2 == "y,," else None
    client = scramp.ScramClient(["SCRAM-SHA-256"], "x", password, channel_binding=binding)
    assert client.get_client_first().startswith(gs2)
    bare = f"n={username},r={client.c_nonce}"
    client.client_first_bare = bare
    exchange = ScramExchange(verifier, valid=valid)
    server_first = exchange.client_first((gs2 + bare).encode())
    client.set_server_first(server_first.decode())
    final = client.get_client_final()
    server_final = exchange.client_final(tamper(final).encode())
    return client, server_final


def test_rfc7677_vector():
    exchange = ScramExchange(rfc_verifier(), server_nonce=RFC_SERVER_NONCE)
    server_first = exchange.client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert server_first == (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    server_final = exchange.client_final(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_libpq_empty_username_and_server_signature():
    verifier = make_verifier("s3cret")
    client, server_final = run_exchange(verifier, "s3cret", username="")
    client.set_server_final(server_final.decode())  # the client checks our signature


def test_wrong_password_fails():
    with pytest.raises(ScramError):
        run_exchange(make_verifier("right"), "wrong")


def test_a_fake_verifier_never_passes():
    key = b"k" * 32
    verifier = fake_verifier("h_unknown", key)
    assert verifier == fake_verifier("h_unknown", key)  # the same salt every time
    assert verifier.salt != fake_verifier("h_other", key).salt
    assert len(verifier.salt) == len(make_verifier("x").salt)
    with pytest.raises(ScramError):
        run_exchange(verifier, "anything", valid=False)
    # Even the right proof for a verifier fails when the exchange was told it's fake.
    real = make_verifier("pw")
    with pytest.raises(ScramError):
        run_exchange(real, "pw", valid=False)


def test_gs2_flag_y_must_match_its_channel_binding():
    run_exchange(make_verifier("pw"), "pw", gs2="y,,")  # c=eSws
    with pytest.raises(ScramError):
        run_exchange(make_verifier("pw"), "pw", tamper=lambda f: f.replace("c=biws", "c=eSws"))


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-server-end-point,,n=,r=abc",  # requires channel binding: not offered
        b"n,a=admin,n=,r=abc",  # authzid
        b"n,,m=ext,n=,r=abc",  # mandatory extension
        b"n,,n=,r=",  # empty nonce
        b"n,,n=,r=ab\x7fc",  # non-printable nonce
        b"n,,n=,r=ab c",
        b"x,,n=,r=abc",
        b"n,,r=abc",
        b"n,,n=",
        b"\xff\xfe",
        b"",
    ],
)
def test_malformed_client_first_is_refused(first):
    with pytest.raises(ScramError):
        ScramExchange(make_verifier("pw")).client_first(first)


def test_client_final_checks():
    verifier = make_verifier("pw")
    with pytest.raises(ScramError):  # another nonce
        run_exchange(verifier, "pw", tamper=lambda f: f.replace(",r=", ",r=X", 1))
    with pytest.raises(ScramError):  # no proof
        run_exchange(verifier, "pw", tamper=lambda f: f.split(",p=")[0])
    with pytest.raises(ScramError):  # a short proof
        run_exchange(verifier, "pw", tamper=lambda f: f.split(",p=")[0] + ",p=AAAA")
    with pytest.raises(ScramError):  # not base64
        run_exchange(verifier, "pw", tamper=lambda f: f.split(",p=")[0] + ",p=***")
    exchange = ScramExchange(verifier)
    with pytest.raises(ScramError):  # final before first
        exchange.client_final(b"c=biws,r=x,p=AAAA")


def test_one_attempt_per_exchange():
    verifier = make_verifier("pw")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "x", "pw")
    exchange = ScramExchange(verifier)
    client.set_server_first(exchange.client_first(client.get_client_first().encode()).decode())
    final = client.get_client_final().encode()
    exchange.client_final(final)
    with pytest.raises(ScramError):
        exchange.client_final(final)
    with pytest.raises(ScramError):
        exchange.client_first(b"n,,n=,r=abc")


def test_verifier_string_is_postgres_format(stack):
    """A verifier Postgres made itself (pg_authid) reads back and checks a real proof."""
    with psycopg.connect(superuser_dsn(stack), autocommit=True) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute("DROP ROLE IF EXISTS gw_scram_check")
        conn.execute("CREATE ROLE gw_scram_check PASSWORD 'from-postgres'")
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'gw_scram_check'").fetchone()
        assert row is not None
        (text,) = row
        conn.execute("DROP ROLE gw_scram_check")
    verifier = Verifier.from_string(text)
    assert verifier.to_string() == text
    client, server_final = run_exchange(verifier, "from-postgres")
    client.set_server_final(server_final.decode())
    ours = make_verifier("x")
    assert Verifier.from_string(ours.to_string()) == ours


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",  # keys too short
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:***$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
    ],
)
def test_verifier_from_junk(text):
    with pytest.raises(ValueError):
        Verifier.from_string(text)


@settings(max_examples=300, deadline=None)
@given(first=st.binary(max_size=80), final=st.binary(max_size=120))
def test_junk_only_ever_raises_scram_error(first, final):
    exchange = ScramExchange(make_verifier_cached())
    try:
        exchange.client_first(first)
    except ScramError:
        return
    with pytest.raises(ScramError):
        exchange.client_final(final)


_CACHED: list[Verifier] = []


def make_verifier_cached() -> Verifier:
    if not _CACHED:
        _CACHED.append(make_verifier("pw"))
    return _CACHED[0]
