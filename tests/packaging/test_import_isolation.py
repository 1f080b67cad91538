"""The server distribution (``bprr``: the package ``app``) imports without the client package
and the harness, which it does not declare: every module under app/, in a fresh interpreter
where importing ``bprr_client`` or ``bprr_harness`` fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
BLOCKED = ("bprr_client", "bprr_harness")

# A meta-path finder ahead of every other: any import of a blocked package fails, as when it is
# not installed. Then every module is imported; the failures come back as JSON.
PROBE = """
import importlib, json, sys, traceback

BLOCKED = {blocked!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
failed = {{}}
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except BaseException as error:
        failed[module] = "".join(traceback.format_exception_only(error)).strip()
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"failed": failed, "leaked": leaked}}))
"""


def app_modules() -> list[str]:
    modules = []
    for path in sorted(APP.rglob("*.py")):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            modules.append(".".join(parts))
    return modules


def test_the_probe_blocks_what_it_should() -> None:
    """The blocker works: the harness and the client package do not import under it."""
    probe = PROBE.format(blocked=BLOCKED, modules=["bprr_client", "bprr_harness.demo.runner"])
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    assert set(result["failed"]) == {"bprr_client", "bprr_harness.demo.runner"}, result


def test_every_app_module_imports_without_the_client_package_and_the_harness() -> None:
    modules = app_modules()
    assert "app.cli" in modules and "app.api.commands" in modules and "app.plugins" in modules
    assert not any(m.startswith(("app.demo", "app.testbed")) for m in modules)
    probe = PROBE.format(blocked=BLOCKED, modules=modules)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert result["leaked"] == []  # and nothing under app imported them
