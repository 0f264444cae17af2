"""The declared surfaces stay true: settings documented, OpenAPI covers every route."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardd import config
from shardd.api.app import ROUTES, canonical, make_app
from shardd.api.auth import TokenTable
from shardd.api.openapi import document
from shardd.errors import Forbidden, Unauthorized
from shardd.server import is_loopback

README = Path(__file__).resolve().parents[2] / "README.md"


def settings_table() -> list[str]:
    """The README's settings table as `config` generates it."""
    return [f"| `{n}` | `{e}` | `{d}` | {h} |" for n, e, d, h in config.documentation_rows()]


def test_the_readme_settings_table_is_the_generated_one() -> None:
    lines = README.read_text().splitlines()
    start = lines.index("| setting | environment | default | meaning |") + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert lines[start:end] == settings_table(), (
        "the README's settings table is stale: regenerate it from tests.unit.test_surface"
        ".settings_table()"
    )


def test_settings_precedence(tmp_path: Path) -> None:
    file = tmp_path / "shardd.toml"
    file.write_text('port = 9000\nrequest_timeout = 2.5\ntokens = ["a:read"]\n')
    loaded = config.load(
        config_file=str(file), environ={"SHARDD_PORT": "9100"}, overrides={"request_timeout": "1.5"}
    )
    assert (loaded.port, loaded.request_timeout, loaded.tokens) == (9100, 1.5, ("a:read",))
    env = config.load(environ={"SHARDD_TOKENS": "x:read; y:admin", "SHARDD_ACCESS_LOG": "no"})
    assert env.tokens == ("x:read", "y:admin") and env.access_log is False
    with pytest.raises(ValueError):
        config.load(environ={"SHARDD_PORT": "eighty"})
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1\n")
    with pytest.raises(ValueError):
        config.load(config_file=str(bad), environ={})


def test_node_addresses_parse_or_fail_clearly() -> None:
    loaded = config.load(
        environ={"SHARDD_NODE_ADDRESSES": "s1-primary=127.0.0.1:7001; s2-replica1=db.local:7002"}
    )
    assert config.node_routes(loaded) == {
        "s1-primary": ("127.0.0.1", 7001),
        "s2-replica1": ("db.local", 7002),
    }
    for bad in ("s1-primary", "=h:1", "s1-primary=host", "s1-primary=host:port"):
        with pytest.raises(ValueError, match="NODE=HOST:PORT"):
            config.node_routes(config.load(environ={"SHARDD_NODE_ADDRESSES": bad}))


def test_openapi_describes_exactly_the_routes() -> None:
    spec_ops = {
        (method.upper(), path)
        for path, ops in document(ROUTES, config.Settings())["paths"].items()
        for method in ops
    }
    app_ops = set()
    for route in ROUTES:
        path = canonical(route.path)
        if path.endswith("/items/{key}"):
            base = path.removesuffix("{key}")
            app_ops |= {(route.method, base + "{pk}"), (route.method, base + "{pk}/{sk}")}
        else:
            app_ops.add((route.method, path))
    assert spec_ops == app_ops


def test_app_registers_every_route() -> None:
    app = make_app(config.Settings())
    registered = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert registered == {(r.method, canonical(r.path)) for r in ROUTES}


def test_token_scopes_imply_lower_ones() -> None:
    table = TokenTable.parse(["reader:read", "writer:write", "boss:admin"])
    table.check("Bearer boss", "admin")
    table.check("Bearer writer", "read")
    with pytest.raises(Forbidden):
        table.check("Bearer reader", "write")
    with pytest.raises(Unauthorized):
        table.check("Bearer nobody", "read")
    with pytest.raises(Unauthorized):
        table.check(None, "read")
    TokenTable.parse([]).check(None, "admin")  # no tokens: open (loopback only)
    for bad in ("noscope", "x:root", ":read"):
        with pytest.raises(ValueError):
            TokenTable.parse([bad])


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_error_codes_are_stable_identifiers() -> None:
    from shardd import errors

    for cls in (errors.BadRequest, errors.NotFound, errors.Conflict, errors.OutcomeUnknown):
        assert re.fullmatch(r"[a-z_]+", cls.code)


def test_openapi_limits_come_from_the_settings() -> None:
    settings = config.Settings(max_key_bytes=77, max_page_size=33, max_batch_keys=9)
    doc = document(ROUTES, settings)
    item = doc["paths"]["/v1/tables/{table}/items/{pk}/{sk}"]["put"]
    params = {p["name"]: p["schema"] for p in item["parameters"]}
    assert params["pk"]["maxLength"] == 77 and params["sk"]["minLength"] == 0
    assert {"400", "401", "403", "404", "409", "412", "413", "503", "504"} <= set(item["responses"])
    scan = doc["paths"]["/v1/tables/{table}/scan"]["get"]
    limit = next(p for p in scan["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 33
    batch = doc["paths"]["/v1/tables/{table}/batch/get"]["post"]
    keys = batch["requestBody"]["content"]["application/json"]["schema"]["properties"]["keys"]
    assert keys["maxItems"] == 9
    assert doc["paths"]["/healthz"]["get"]["security"] == []
