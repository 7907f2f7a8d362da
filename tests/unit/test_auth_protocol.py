"""Access control protocol logic, no I/O: scopes, credentials, rules, tag protection, grants, tokens."""

import base64
import time

import jwt
import pytest

from cargohold.coordinator.accounts import SigningKey
from cargohold.auth.credentials import challenge, parse_authorization
from cargohold.auth.passwords import check_password, hash_password, parse_htpasswd
from cargohold.auth.rules import DEFAULT_POLICY, Policy, RulesError, compile_pattern, grant
from cargohold.auth.scopes import Need, Scope, ScopeError, parse_scope, parse_scopes, required
from cargohold.auth.subjects import ANONYMOUS, Subject, valid_account_name
from cargohold.auth.tokens import TokenError, access_map, decode_token, encode_token, token_claims

RULES = {
    "rules": [
        {"subjects": ["anonymous"], "repositories": ["public/**"], "actions": ["pull"]},
        {"subjects": ["group:devs", "robot:ci"], "repositories": ["team/**"], "actions": ["pull", "push", "delete"]},
        {"subjects": ["user:reader"], "repositories": ["team/*"], "actions": ["pull"]},
        {"subjects": ["user:ops"], "repositories": ["**"], "actions": ["admin"]},
        {"subjects": ["authenticated"], "repositories": ["shared"], "actions": ["pull"]},
    ],
    "protected_tags": [{"repositories": ["team/**"], "tags": ["v*", "stable"], "subjects": ["robot:ci"]}],
}
ALICE = Subject("user", "alice", frozenset({"devs"}))
READER = Subject("user", "reader")
CI = Subject("robot", "ci")
OPS = Subject("user", "ops")
ROOT = Subject("user", "root", admin=True)


def test_scope_parsing():
    assert parse_scope("repository:library/alpine:pull,push") == Scope("repository", "library/alpine", ("pull", "push"))
    assert parse_scope("repository(plugin):a:pull").type == "repository"
    assert parse_scope("registry:catalog:*") == Scope("registry", "catalog", ("*",))
    assert parse_scope("repository:a:pull,metadata-read").actions == ("pull",)   # unknown actions grant nothing
    assert parse_scope("repository:a:").actions == ()
    assert [str(s) for s in parse_scopes(["repository:a:pull repository:b:push", "registry:catalog:*"])] == [
        "repository:a:pull", "repository:b:push", "registry:catalog:*"]


@pytest.mark.parametrize("text", [
    "", "repository", "repository:a", "repo:a:pull", "repository:../etc:pull", "repository:a/../b:pull",
    "repository:/a:pull", "repository:A:pull", "repository:a:pull,\r\nX-Evil: 1", 'repository:a:pull"',
    "registry:everything:*", "repository:a b:pull", "repository:" + "a" * 300 + ":pull", "repository:a:PULL",
    "repository:a%2f..:pull",
])
def test_bad_scopes_are_refused(text):
    with pytest.raises(ScopeError):
        parse_scope(text)


def test_authorization_headers():
    basic = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    assert parse_authorization(basic) == parse_authorization(basic.replace("Basic", "basic"))
    creds = parse_authorization(basic)
    assert (creds.scheme, creds.username, creds.password) == ("basic", "alice", "pa:ss")
    assert parse_authorization("Bearer abc.def.ghi").token == "abc.def.ghi"
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(), "Bearer ", "Bearer a b",
                "Digest x", "Bearer a\r\nb", "Basic " + base64.b64encode(b":pw").decode(), "Bearer " + "a" * 9000):
        with pytest.raises(ValueError):
            parse_authorization(bad)


def test_challenge_cannot_be_broken_out_of():
    header = challenge('http://h/token",x="1', 'svc\r\nSet-Cookie: a', "repository:a:pull")
    assert header.count('"') == 6 and "\r" not in header and "\n" not in header
    assert header.startswith('Bearer realm="http://h/token,x=1",service="svcSet-Cookie: a",scope=')


def test_patterns():
    star, double = compile_pattern("team/*", path=True), compile_pattern("team/**", path=True)
    assert star.fullmatch("team/a") and not star.fullmatch("team/a/b") and not star.fullmatch("teams/a")
    assert double.fullmatch("team/a/b") and not double.fullmatch("team")
    assert compile_pattern("v*", path=False).fullmatch("v1.2") and compile_pattern("a?c", path=True).fullmatch("abc")
    assert not compile_pattern("a.b", path=True).fullmatch("axb")   # dots are literal
    for bad in ("", "Team/*", "a b", "(a)", "a|b", "x" * 301):
        with pytest.raises(RulesError):
            compile_pattern(bad, path=True)


def test_rules_decide_actions():
    policy = Policy.parse(RULES)
    assert policy.actions(ANONYMOUS, "public/x") == {"pull"}
    assert policy.actions(ANONYMOUS, "team/x") == frozenset()
    assert policy.actions(ALICE, "team/x/y") == {"pull", "push", "delete"}
    assert policy.actions(ALICE, "shared") == {"pull"}                      # any authenticated subject
    assert policy.actions(READER, "team/x") == {"pull"} and policy.actions(READER, "team/x/y") == frozenset()
    assert policy.actions(CI, "team/x") == {"pull", "push", "delete"}
    assert policy.actions(Subject("user", "ci"), "team/x") == frozenset()      # a user is not the robot
    assert policy.actions(OPS, "anything/at/all") == {"pull", "push", "delete", "admin"}
    assert policy.is_admin(OPS) and policy.is_admin(ROOT) and not policy.is_admin(ALICE)
    assert policy.actions(ROOT, "x") == {"pull", "push", "delete", "admin"}


def test_tag_protection():
    policy = Policy.parse(RULES)
    assert not policy.may_touch_tag(ALICE, "team/app", "v1.0") and not policy.may_touch_tag(ALICE, "team/app", "stable")
    assert policy.may_touch_tag(CI, "team/app", "v1.0") and policy.may_touch_tag(ALICE, "team/app", "latest")
    assert policy.may_touch_tag(ALICE, "other/app", "v1.0")
    assert not policy.may_touch_tag(ROOT, "team/app", "v1")       # admins are not exempt: name them


@pytest.mark.parametrize("document", [
    None, [], {"rules": "x"}, {"rules": [{"subjects": ["someone"], "repositories": ["a"], "actions": ["pull"]}]},
    {"rules": [{"subjects": ["user:a"], "repositories": ["a"], "actions": ["fly"]}]},
    {"rules": [{"subjects": [], "repositories": ["a"], "actions": ["pull"]}]},
    {"rules": [{"subjects": ["user:a"], "repositories": ["../a"], "actions": ["pull"]}]},
    {"protected_tags": [{"repositories": ["a"], "tags": ["v/1"], "subjects": ["user:a"]}]},
    {"rules": [], "extra": 1},
])
def test_bad_rules_documents(document):
    with pytest.raises(RulesError):
        Policy.parse(document)


def test_default_policy_lets_accounts_work_and_nobody_else():
    assert DEFAULT_POLICY.actions(ALICE, "any/repo") == {"pull", "push", "delete"}
    assert DEFAULT_POLICY.actions(ANONYMOUS, "any/repo") == frozenset()
    assert not DEFAULT_POLICY.is_admin(ALICE) and DEFAULT_POLICY.is_admin(ROOT)


def test_grant_cuts_requests_down_to_the_rules():
    policy = Policy.parse(RULES)
    scopes = parse_scopes(["repository:team/a:pull,push", "repository:secret:pull", "repository:team/b:*",
                           "registry:catalog:*", "registry:admin:*"])
    access = {(e["type"], e["name"]): e["actions"] for e in grant(policy, READER, scopes)}
    assert access == {("repository", "team/a"): ["pull"], ("repository", "secret"): [],
                      ("repository", "team/b"): ["pull"], ("registry", "catalog"): ["*"], ("registry", "admin"): []}
    access = {(e["type"], e["name"]): e["actions"] for e in grant(policy, OPS, scopes)}
    assert access[("repository", "team/b")] == ["delete", "pull", "push"] and access[("registry", "admin")] == ["*"]


def test_required_actions():
    assert required("GET", "manifest", "/v2/a/manifests/x", {"name": "a"}) == Need("pull", "a")
    assert required("HEAD", "blob", "/v2/a/blobs/x", {"name": "a"}) == Need("pull", "a")
    assert required("PUT", "manifest", "", {"name": "a"}) == Need("push", "a")
    assert required("POST", "uploads", "", {"name": "a"}) == Need("push", "a")
    assert required("GET", "upload", "", {"name": "a"}) == Need("push", "a")
    assert required("DELETE", "upload", "", {"name": "a"}) == Need("push", "a")
    assert required("DELETE", "manifest", "", {"name": "a"}) == Need("delete", "a")
    assert required("DELETE", "blob", "", {"name": "a"}) == Need("delete", "a")
    assert required("GET", "base", "/v2/", {}) == Need("login")
    assert required("GET", "catalog", "/v2/_catalog", {}) == Need("catalog")
    assert required("POST", "service", "/admin/gc", {}) == Need("admin")
    assert required("GET", "service", "/administrator", {}) is None
    for path in ("/token", "/healthz", "/readyz", "/metrics"):
        assert required("GET", "service", path, {}) is None
    assert Need("push", "a").scope == "repository:a:pull,push" and Need("admin").scope == "registry:admin:*"


def test_a_mount_needs_push_and_its_challenge_asks_for_pull_on_the_source():
    def query(**values):
        return values.get

    need = required("POST", "uploads", "", {"name": "a"}, query(mount="sha256:x", **{"from": "b/c"}))
    assert need == Need("push", "a", mount_from="b/c")
    assert need.scope == "repository:a:pull,push repository:b/c:pull"      # space-separated, as Distribution
    assert parse_scopes([need.scope]) == [Scope("repository", "a", ("pull", "push")),
                                          Scope("repository", "b/c", ("pull",))]
    # Not a mount, a mount from itself, or a `from` that is no repository name: the plain scope.
    for values in ({"from": "b"}, {"mount": "sha256:x"}, {"mount": "sha256:x", "from": "a"},
                   {"mount": "sha256:x", "from": "B/../x"}, {"mount": "sha256:x", "from": "x\" y"}):
        assert required("POST", "uploads", "", {"name": "a"}, values.get) == Need("push", "a")
    assert required("PUT", "upload", "", {"name": "a"}, query(mount="m", **{"from": "b"})) == Need("push", "a")


KEY = SigningKey("k1", b"s" * 32, 0.0)


def _keys(kid):
    return KEY if kid == KEY.key_id else None


def test_tokens_round_trip_and_refusals():
    subject_access = [{"type": "repository", "name": "a", "actions": ["pull"]}]
    now = time.time()
    token = encode_token(token_claims(ALICE, subject_access, "svc", 300, now), KEY)
    claims = decode_token(token, _keys, "svc")
    assert claims["sub"] == "alice" and access_map(claims) == {("repository", "a"): {"pull"}}
    assert claims["exp"] - claims["iat"] == 300
    with pytest.raises(TokenError):
        decode_token(token, _keys, "other-service")                      # wrong audience
    with pytest.raises(TokenError):
        decode_token(encode_token(token_claims(ALICE, [], "svc", 300, now - 400), KEY), _keys, "svc")  # expired
    with pytest.raises(TokenError):
        decode_token(encode_token(token_claims(ALICE, [], "svc", 300, now), SigningKey("k1", b"x" * 32, 0)),
                     _keys, "svc")                                       # forged: another secret, same kid
    with pytest.raises(TokenError):
        decode_token(encode_token(token_claims(ALICE, [], "svc", 300, now), SigningKey("k9", b"s" * 32, 0)),
                     _keys, "svc")                                       # unknown key id
    unsigned = jwt.encode(token_claims(ALICE, [], "svc", 300, now), None, algorithm="none", headers={"kid": "k1"})
    with pytest.raises(TokenError):
        decode_token(unsigned, _keys, "svc")
    head, body, sig = token.split(".")
    forged_body = base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "==").replace(b'"pull"', b'"push"'))
    with pytest.raises(TokenError):
        decode_token(f"{head}.{forged_body.decode().rstrip('=')}.{sig}", _keys, "svc")
    assert decode_token(encode_token(token_claims(ANONYMOUS, [], "svc", 300, now), KEY), _keys, "svc")["sub"] == ""


def test_passwords_and_htpasswd():
    hashed = hash_password("correct horse", cost=4)
    assert check_password("correct horse", hashed) and not check_password("wrong", hashed)
    assert not check_password("x" * 100, hashed) and not check_password("a", "not-a-hash")
    with pytest.raises(ValueError):
        hash_password("x" * 73, cost=4)
    text = f"# comment\nalice:{hashed.replace('$2b$', '$2y$')}\nbob:{{SHA}}abc\nBad Name:{hashed}\n\n"
    users = parse_htpasswd(text)
    assert list(users) == ["alice"] and check_password("correct horse", users["alice"])


def test_account_names():
    for good in ("alice", "a", "ci-bot.1", "x_y"):
        assert valid_account_name(good)
    for bad in ("", "Alice", "robot$x", "a/b", "-a", "a:b", "é", "a" * 65, "a b"):
        assert not valid_account_name(bad)
