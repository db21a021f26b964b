"""The engine behind a real fence: it defines all it uses below the fence line, reads nothing from the part above
but the actions handed to it, and offers a small public surface (`__all__`) that the tests reach it through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bot
from tests.conftest import ROOT

SOURCE = (ROOT / "bot.py").read_text(encoding="utf-8")
FENCE = re.search(r"^# ===== The engine.*$", SOURCE, re.MULTILINE)
ABOVE, BELOW = ast.parse(SOURCE[: FENCE.start()]), ast.parse(SOURCE[FENCE.start() :])


def defined(tree: ast.Module) -> set[str]:
    """The names a module's top level binds: definitions, assignments and imports."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_the_engine_reads_nothing_from_the_part_above_the_fence_but_the_actions_handed_to_it():
    main_block = [node for node in BELOW.body if isinstance(node, ast.If)]  # if __name__ == "__main__": main(ACTIONS)
    engine = ast.Module(body=[node for node in BELOW.body if node not in main_block], type_ignores=[])
    used = {node.id for node in ast.walk(engine) if isinstance(node, ast.Name)}
    only_above = defined(ABOVE) - defined(BELOW)
    assert used & only_above == set()  # e.g. no ACTIONS, no import the engine forgot to make itself
    assert {node.id for block in main_block for node in ast.walk(block) if isinstance(node, ast.Name)} & only_above == {
        "ACTIONS"
    }


def test_the_public_surface_is_small_and_every_name_in_it_exists():
    assert len(bot.__all__) <= 12 and len(set(bot.__all__)) == len(bot.__all__)
    assert all(hasattr(bot, name) for name in bot.__all__)


def test_the_tests_reach_the_engine_through_its_public_surface():
    """A reshape of the engine's insides should not break the tests: references to engine names outside `__all__`
    (unit tests of pure functions that cannot be reached otherwise) stay few."""
    private = {name for name in defined(BELOW) - set(bot.__all__) if not name.startswith("__")}
    references = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        references += [f"{path.name}: bot.{name}" for name in re.findall(r"\bbot\.(\w+)", text) if name in private]
    assert len(references) <= 40, "\n".join(references)
