"""The pinned command lines, run as real processes: `serve` and `sync` through the CLI."""

from __future__ import annotations

import json

import jsonschema

from hasync.config.store import ConfigStore
from hasync.core import schemas
from support.agents import cli, free_port, start_agent, stop
from support.nodes import Pair


def test_serve_stops_cleanly_on_sigterm(pair: Pair) -> None:
    proc, url = start_agent(pair.backup, "--services-dir", str(pair.services_dir), "--state-dir",
                            str(pair.state_dir))
    assert url.startswith("https://127.0.0.1:")
    # first start generated a self-signed certificate in the state dir, kept for the next start
    cert = (pair.state_dir / "agent.crt").read_bytes()
    assert stop(proc) == 0
    assert proc.stderr is not None and "agent stopped" in proc.stderr.read()
    proc, _ = start_agent(pair.backup, "--services-dir", str(pair.services_dir), "--state-dir", str(pair.state_dir))
    assert stop(proc) == 0
    assert (pair.state_dir / "agent.crt").read_bytes() == cert


def test_serve_plain_http_needs_the_flag(pair: Pair) -> None:
    proc, url = start_agent(pair.backup, "--plain-http", "--services-dir", str(pair.services_dir),
                            "--state-dir", str(pair.state_dir))
    assert url.startswith("http://")
    assert stop(proc) == 0


def test_serve_uses_webgui_certificate(pair: Pair) -> None:
    import base64

    with ConfigStore(pair.backup).transaction("test: GUI certificate") as root:
        from lxml import etree

        webgui = root.find("system/webgui")
        assert webgui is not None
        etree.SubElement(webgui, "ssl-certref").text = "6512abcd"
        cert = etree.SubElement(root, "cert")
        etree.SubElement(cert, "refid").text = "6512abcd"
        etree.SubElement(cert, "descr").text = "Web GUI"
        etree.SubElement(cert, "crt").text = base64.b64encode(pair.cert_file.read_bytes()).decode()
        etree.SubElement(cert, "prv").text = base64.b64encode(pair.key_file.read_bytes()).decode()
    proc, _ = start_agent(pair.backup, "--services-dir", str(pair.services_dir), "--state-dir", str(pair.state_dir))
    assert stop(proc) == 0
    assert (pair.state_dir / "webgui.crt").read_bytes() == pair.cert_file.read_bytes()
    assert not (pair.state_dir / "agent.crt").exists()


def test_serve_bad_listen_is_a_clear_error(pair: Pair) -> None:
    result = cli(pair.backup, "serve", "--listen", "127.0.0.1", "--services-dir", str(pair.services_dir),
                 "--state-dir", str(pair.state_dir))
    assert result.returncode == 2
    assert "expected ADDR:PORT" in result.stderr


def test_sync_json_validates_and_progress_on_stderr(pair: Pair, agent: str) -> None:
    result = cli(pair.primary, "sync", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    jsonschema.validate(document, schemas.load("sync-result"))
    assert document["status"] == "ok" and document["target"] == agent
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("] ", 1)[1].split(" ok")[0] for line in steps] == [
        "build payload", "firmware_version", "restore_config_section", "filter_configure"]


def test_sync_dry_run_changes_nothing(pair: Pair, agent: str) -> None:
    before = (pair.backup / "config.xml").read_bytes()
    result = cli(pair.primary, "sync", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    assert "restore_config_section" not in [s["step"] for s in document["steps"]]
    assert (pair.backup / "config.xml").read_bytes() == before


def test_sync_failure_exit_code_and_json(pair: Pair) -> None:
    pair.point_primary_at(f"https://127.0.0.1:{free_port()}/")
    result = cli(pair.primary, "sync", "--json", "--retries", "0", "--connect-timeout", "2")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    jsonschema.validate(document, schemas.load("sync-result"))
    assert document["status"] == "error" and "remote host down" in document["message"]


def test_unknown_item_is_named(pair: Pair, agent: str) -> None:
    result = cli(pair.primary, "sync", "--items", "rules,nosuchitem")
    assert result.returncode != 0
    assert "nosuchitem" in result.stderr + result.stdout


def test_status_text_and_json(pair: Pair, agent: str) -> None:
    text = cli(pair.primary, "status")
    assert text.returncode == 0, text.stderr
    assert "SERVICE" in text.stdout and "unbound" in text.stdout
    document = json.loads(cli(pair.primary, "status", "--json").stdout)
    assert set(document) == {"version", "services", "confirm"}  # confirm: the agent has commit-confirmed sync
    assert "_my_version" in document["version"]["firmware"]
