"""README section 4, "How to add an action", runs as written: its function, its tools.yaml block pasted under
`paths:`, and its tests, applied to a copy of the project, pass; the bot answers the new path, and refuses as shown."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SECTION = (ROOT / "README.md").read_text(encoding="utf-8").split("## 4. 添加动作")[1].split("\n## 5.")[0]
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", SECTION, re.DOTALL)


def block(language: str, containing: str) -> str:
    """A code block of README section 4, without the three spaces of the numbered list it sits in."""
    [found] = [text for lang, text in BLOCKS if lang == language and containing in text]
    return "\n".join(line.removeprefix("   ") for line in found.splitlines()) + "\n"


def test_the_add_an_action_recipe_runs_as_written(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".env"))
    function, registry = block("python", "def get_stock").split("\n\nACTIONS")
    bot = (project / "bot.py").read_text(encoding="utf-8")
    registered = re.search(r"\nACTIONS: .*? = \{.*?\n\}", bot, re.DOTALL)  # bot.py's own ACTIONS block
    assert registered, "bot.py has an ACTIONS block"
    bot = bot.replace(registered.group(0), f"\n{function.rstrip()}\n\n\nACTIONS{registry.rstrip()}")
    (project / "bot.py").write_text(bot, encoding="utf-8")
    tools = (project / "tools.yaml").read_text(encoding="utf-8")
    pasted = block("yaml", "/v1/actions/stock")  # "under the existing paths:", before components:
    (project / "tools.yaml").write_text(tools.replace("\ncomponents:", f"\n{pasted.rstrip()}\ncomponents:", 1))
    tests = project / "tests" / "test_actions.py"
    tests.write_text(tests.read_text(encoding="utf-8") + "\n\n" + block("python", "def test_get_stock"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=project, capture_output=True, text=True, timeout=60)

    tested = run(
        "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", "tests/test_actions.py", "tests/test_tools_yaml.py"
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "passed" in tested.stdout
    answered = run("-m", "tests.simulate", "--path", "/v1/actions/stock", "AAPL", "5")
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert '"price": 123.45' in answered.stdout
    refused = run("-m", "tests.simulate", "--path", "/v1/actions/stock", "MSFT")
    assert refused.returncode == 1
    assert 'status 400  body {"success": false, "error": "没有这只股票 / no such symbol: MSFT"}' in refused.stdout
