"""The package's folders draw its architecture: each subpackage imports only the ones below it, and no
module grows past 400 lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "offload_prune"
#: Bottom to top. The package root holds the error and size helpers (basics) and the options (config), below
#: everything, and the entry points (cli, api, demo), above everything.
LAYERS = ["basics", "config", "disk", "runtime", "model", "surgery", "methods", "reconstruct", "quantize", "plan", "data", "evaluation", "stream"]
ENTRY_POINTS = {"__init__", "__main__", "cli", "api", "demo"}
BELOW_ANYTHING = {"data": {"basics", "config"}}  # may import only these


def room(module: str) -> str:
    """The layer a dotted module (under offload_prune) belongs to."""
    first = module.split(".")[0]
    return "entry" if first in ENTRY_POINTS or not first else first


def imported_modules(path: Path) -> set[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None:  # from . import x: x is a module or a name of the package
                found.update(".".join([*target, alias.name]) for alias in node.names)
            else:
                found.add(".".join(target))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("offload_prune."):
            found.add(node.module.removeprefix("offload_prune."))
    return found


def test_subpackages_import_only_downward():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = room(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if here == "entry":
            continue
        for target in imported_modules(path):
            there = room(target)
            if there == "__version__" or target == "__version__":
                continue
            allowed = BELOW_ANYTHING.get(here)
            ok = (there in allowed or there == here) if allowed else (
                there != "entry" and LAYERS.index(there) <= LAYERS.index(here))
            if not ok:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for folder in [p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "Imports" in doc, folder.name


def test_the_readme_is_a_manual_and_every_flag_is_documented():
    from offload_prune.cli import eval_parser, plan_parser

    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) < 350
    documented = readme + "".join(p.read_text() for p in (root / "docs").glob("*.md"))
    flags = {s for parser in (plan_parser(), eval_parser()) for action in parser._actions
             for s in action.option_strings if s.startswith("--") and s != "--help"}
    spellings = lambda flag: {flag, "--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")}  # noqa: E731
    missing = sorted(f for f in flags if not any(s in documented for s in spellings(f)))
    assert not missing, missing
