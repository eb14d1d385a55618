"""The payload against OPNsense's own PHP (``../shared/anchors``): get_vip_config_section(),
copy_conf_section() and IXR's bytes, run on our fixtures.

Skips cleanly when ``../shared`` or ``php`` (with php-xml) is absent. PHP's remove_nosync leaves
holes that IXR sends as a struct; none of the configs used here has a nosync record whose removal
leaves one, so the values compare directly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.core import xmlsafe
from hasync.payload.build import build_payload
from hasync.payload.merge import merge_payload
from hasync.wire import xmlrpc
from support.paths import FIXTURES, shared_path

CONFIGS = FIXTURES / "configs"
PHP_TIMEOUT = 60

# Our own few lines of PHP: OPNsense's payload for a config, encoded by its IXR library.
IXR_REQUEST_PHP = """
require_once($argv[1] . '/opnsense-core/contrib/IXR/IXR_Library.php');
require_once($argv[1] . '/opn.php');
opn_load($argv[1] . '/opnsense-core');
global $config;
$config = opn_load_array($argv[2]);
$request = new IXR_Request('opnsense.restore_config_section', [opn_payload($config, explode(',', $argv[3]))]);
echo $request->getXml();
"""


@pytest.fixture(scope="module")
def anchors() -> Path:
    """../shared/anchors with a php that can parse XML, or a skip saying what is missing."""
    oracle = shared_path("anchors", "php-oracle")
    php = shutil.which("php")
    if php is None:
        pytest.skip("php is not installed (Debian: php-cli php-xml)")
    modules = subprocess.run([php, "-m"], capture_output=True, text=True, timeout=PHP_TIMEOUT).stdout
    if "SimpleXML" not in modules:
        pytest.skip("php has no SimpleXML (Debian: php-xml)")
    return oracle.parent


def php_payload(anchors: Path, config: Path, sections: list[str], mode: str = "payload") -> Any:
    """What rc.filter_synchronize sends for `sections` of `config` (`payload-intended`: with
    copy_conf_section as intended, the oracle's form of our deliberate difference)."""
    done = subprocess.run([str(anchors / "php-oracle"), mode, str(config), ",".join(sections)],
                          capture_output=True, text=True, timeout=PHP_TIMEOUT, check=True)
    return json.loads(done.stdout)


def ours(config: Path, sections: list[str]) -> dict[str, Any]:
    return build_payload(xmlsafe.parse_bytes(config.read_bytes()), sections)


@pytest.mark.parametrize("name", ["vip-stack.xml", "primary.xml", "legacy.xml", "backup.xml"])
def test_vip_section_is_phps(anchors: Path, name: str) -> None:
    config = CONFIGS / name
    assert ours(config, ["virtualip"]) == php_payload(anchors, config, ["virtualip"])


def test_vip_section_bytes_are_ixrs(anchors: Path) -> None:
    config = CONFIGS / "vip-stack.xml"
    theirs = subprocess.run(["php", "-r", IXR_REQUEST_PHP, "--", str(anchors), str(config), "virtualip"],
                            capture_output=True, timeout=PHP_TIMEOUT, check=True).stdout
    assert b"<name>advskew</name><value><string></string></value>" in theirs  # the case under test is there
    assert xmlrpc.dumps_request("opnsense.restore_config_section", [ours(config, ["virtualip"])]) == theirs


LEGACY_CRON = """<?xml version="1.0"?>
<opnsense>
  <cron>
    <item><minute>1,31</minute><hour>0-5</hour><mday>*</mday><month>*</month><wday>*</wday>
      <who>root</who><command>adjkerntz -a</command></item>
  </cron>
</opnsense>
"""


BACKUP_CRON = """<?xml version="1.0"?>
<opnsense><OPNsense><cron version="1.0.4"><jobs><job uuid="c1c1c1c1-0000-4000-8000-000000000001">
  <origin>cron</origin><enabled>1</enabled><minute>0</minute><hour>3</hour><day>*</day><month>*</month>
  <weekdays>*</weekdays><who>root</who><command>firmware changelog cron</command><parameters/>
  <description>nightly changelog</description></job></jobs></cron></OPNsense></opnsense>
"""


def test_legacy_top_level_cron_is_not_sent_as_the_cron_model(anchors: Path, tmp_path: Path) -> None:
    """README "Where we deliberately differ": PHP's copy_conf_section() goes on searching the same
    level after the missing `OPNsense`, so a legacy top-level <cron> travels as `OPNsense.cron` and
    lands in the backup's Cron model as records it has no field for; we send the missing model as
    missing, which leaves the backup's jobs alone."""
    config, backup, sent = tmp_path / "config.xml", tmp_path / "backup.xml", tmp_path / "payload.json"
    config.write_text(LEGACY_CRON)
    backup.write_text(BACKUP_CRON)
    theirs = php_payload(anchors, config, ["OPNsense.cron"])
    assert theirs["OPNsense"]["cron"]["item"][0]["command"] == "adjkerntz -a"  # PHP's behaviour, shown
    sent.write_text(json.dumps(theirs))
    merged = subprocess.run([str(anchors / "php-oracle"), "merge", str(backup), str(sent)], capture_output=True,
                            text=True, timeout=PHP_TIMEOUT, check=True).stdout
    assert sorted(json.loads(merged)["OPNsense"]["cron"]) == ["@attributes", "item", "jobs"]  # legacy items added
    assert ours(config, ["OPNsense.cron"]) == {"OPNsense": {"cron": []}}
    assert ours(config, ["OPNsense.cron"]) == php_payload(anchors, config, ["OPNsense.cron"], "payload-intended")
    backup_root = xmlsafe.parse_bytes(BACKUP_CRON.encode())
    before = etree.tostring(backup_root)
    merge_payload(backup_root, ours(config, ["OPNsense.cron"]), SyncItemRegistry.load())
    assert etree.tostring(backup_root) == before  # the backup's cron jobs stay as they are
