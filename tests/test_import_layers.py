"""The import arrows run one way: entry point -> engine -> one task's training -> methods and synthesis -> models,
data and runtime -> tuning -> reporting -> experiment (run infrastructure). Every import counts, also one inside a
function or under TYPE_CHECKING. ``python tests/test_import_layers.py`` prints the arrows between packages."""

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom: a module may import its own layer or a lower one.
LAYERS = (
    ("main",),
    ("incremental_train_and_eval",),
    ("training",),
    ("methods", "continual_class_specific_impression", "synthesis_losses"),
    ("models", "dataloaders", "runtime"),
    ("tuning",),
    ("reporting",),
    ("experiment",),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str | None:
    """The layer unit (a root module or a package) that ``module`` belongs to; None outside the project."""
    head = module.split(".")[0]
    return head if head in RANK else None


def project_files() -> list[Path]:
    return sorted(
        p for unit in RANK for p in ([ROOT / f"{unit}.py", *sorted((ROOT / unit).rglob("*.py"))]) if p.is_file()
    )


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def arrows() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files that make the arrow."""
    out = defaultdict(list)
    for path in project_files():
        src = unit_of(path.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."))
        for target in {unit_of(m) for m in imports_of(path)} - {None, src}:
            out[(src, target)].append(path.relative_to(ROOT).as_posix())
    return dict(out)


def test_every_project_module_belongs_to_a_layer():
    top = {
        p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert top - set(RANK) == set(), "add the new root module or package to LAYERS"


def test_no_import_runs_up_the_layers():
    upward = {f"{a} -> {b}": files for (a, b), files in arrows().items() if RANK[b] < RANK[a]}
    assert upward == {}


def test_units_of_one_layer_do_not_import_each_other_both_ways():
    graph = arrows()
    both = sorted(f"{a} <-> {b}" for (a, b) in graph if (b, a) in graph and a < b)
    assert both == []


if __name__ == "__main__":
    for (a, b), files in sorted(arrows().items(), key=lambda kv: (RANK[kv[0][0]], kv[0])):
        sys.stdout.write(f"{a} -> {b}  ({len(files)} file(s))\n")
