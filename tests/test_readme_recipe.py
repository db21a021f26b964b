"""README section 4, "How to add an action", runs as written: its function and its line in ACTIONS, its tools.yaml block
pasted at the end of `paths:`, and its tests (calls through the bot, with the `skill` fixture), added to the starter as
shipped (its demo skills, on this engine), pass; the bot answers the new path, and refuses as shown. The starter as
shipped, not this project: your own skills (or the recipe, followed already) are yours to change."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.test_own_skills import ENGINE_1_0_0_PART, TOOLS_1_0_0, project_with

SECTION = (ROOT / "README.md").read_text(encoding="utf-8").split("## 4. 添加动作")[1].split("\n## 5.")[0]
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", SECTION, re.DOTALL)


def block(language: str, containing: str) -> str:
    """A code block of README section 4, without the three spaces of the numbered list it sits in."""
    [found] = [text for lang, text in BLOCKS if lang == language and containing in text]
    return "\n".join(line.removeprefix("   ") for line in found.splitlines()) + "\n"


def test_the_add_an_action_recipe_runs_as_written(tmp_path: Path) -> None:
    project = project_with(tmp_path, ENGINE_1_0_0_PART.read_text(encoding="utf-8"))  # the demo skills as shipped
    shutil.copy(TOOLS_1_0_0, project / "tools.yaml")
    function, registry = block("python", "def get_stock").split("\n\nACTIONS")
    [line] = [line for line in registry.splitlines() if "get_stock" in line]  # the one line the recipe adds
    bot = (project / "bot.py").read_text(encoding="utf-8")
    [registry_node] = [  # bot.py's own ACTIONS, kept: the recipe adds one line to it
        node
        for node in ast.parse(bot).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and ast.unparse(node.targets[0] if isinstance(node, ast.Assign) else node.target) == "ACTIONS"
    ]
    lines = bot.splitlines(keepends=True)
    registered = "".join(lines[registry_node.lineno - 1 : registry_node.end_lineno]).rstrip()
    extended = registered[:-1].rstrip().rstrip(",") + f",\n{line}\n}}"  # the closing brace, and the line before it
    bot = bot.replace(registered, f"{function.strip()}\n\n\n{extended}", 1)
    (project / "bot.py").write_text(bot, encoding="utf-8")
    tools = (project / "tools.yaml").read_text(encoding="utf-8")
    pasted = block("yaml", "/v1/actions/stock").rstrip()  # "at the end of the existing paths:", before components:
    if "\ncomponents:" in tools:
        tools = tools.replace("\ncomponents:", f"\n{pasted}\ncomponents:", 1)
    else:
        tools = f"{tools.rstrip()}\n{pasted}\n"
    (project / "tools.yaml").write_text(tools, encoding="utf-8")
    tests = project / "tests" / "test_actions.py"  # the recipe's tests alone: the author's own test their own skills
    existing = ""
    recipe = block("python", "def test_get_stock")
    imported = {alias.name for node in ast.parse(existing).body if isinstance(node, ast.Import) for alias in node.names}
    needed = [name for name in ("pytest", "bot") if f"{name}." in recipe and name not in imported]  # what its tests use
    imports = "".join(f"import {name}\n" for name in needed)
    tests.write_text("\n\n".join(filter(None, [existing.rstrip(), imports, recipe])), encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=project, capture_output=True, text=True, timeout=120)

    tested = run(
        "-m", "pytest", "-rA", "-n0", "-p", "no:cacheprovider", "tests/test_actions.py", "tests/test_tools_yaml.py"
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = re.findall(r"^async def (test_\w+)", recipe, re.MULTILINE)
    assert len(names) == 2  # one happy path, one failure path
    for name in names:  # each ran, and passed
        assert f"PASSED tests/test_actions.py::{name}" in tested.stdout, tested.stdout
    answered = run("-m", "tests.simulate", "--path", "/v1/actions/stock", "AAPL", "5")
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert '"price": 123.45' in answered.stdout
    refused = run("-m", "tests.simulate", "--path", "/v1/actions/stock", "MSFT")
    assert refused.returncode == 1
    assert 'status 400  body {"success": false, "error": "没有这只股票 / no such symbol: MSFT"}' in refused.stdout
