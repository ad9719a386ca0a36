"""What adding a method or a data set touches (docs/where-things-go.md, README "Adding a method"): in a temporary
copy of the repository, a throw-away method and a throw-away data set are added exactly as documented, and the
registry, the method tests, the configs check and the generated docs pick them up."""

import shutil
import subprocess
import sys

import pytest

from tiny import ROOT

pytestmark = pytest.mark.e2e

METHOD = '''
from experiment.config import Option, register_options
from methods.finetune import Finetune
from methods.registry import register_method

register_options("throwaway", [Option("throwaway_weight", "float", 1.0, "a throw-away key", min=0.0)])


@register_method("throwaway")
class Throwaway(Finetune):
    """A throw-away method (tests/test_extension_points.py)."""
'''

DATASET = '''
from dataloaders.digits import load_digits
from dataloaders.image_set import DataSplits
from dataloaders.registry import register_dataset


@register_dataset("throwaway_digits")
def load_throwaway(cfg) -> DataSplits:
    """Digits under another name (tests/test_extension_points.py)."""
    return load_digits(cfg)
'''


def copy_repository(target):
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def add_to_import_list(path, anchor: str, module: str) -> None:
    """Insert ``module`` into the explicit import list that starts at ``anchor`` in ``path``."""
    text = path.read_text()
    assert anchor in text, f"{path}: the documented import list is gone"
    path.write_text(text.replace(anchor, anchor + f"    {module},\n", 1))


def run(repo, *args):
    return subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=600)


def test_a_new_method_and_data_set_touch_the_documented_files_and_are_picked_up(tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo)
    (repo / "methods" / "throwaway.py").write_text(METHOD)
    add_to_import_list(
        repo / "methods" / "__init__.py",
        "from methods import (  # noqa: F401  (each module registers its method)\n",
        "throwaway",
    )
    (repo / "configs" / "digits" / "throwaway.yaml").write_text("defaults: _base.yaml\nmethod: throwaway\n")
    (repo / "dataloaders" / "throwaway_data.py").write_text(DATASET)
    init = repo / "dataloaders" / "__init__.py"
    init.write_text(
        init.read_text().replace(
            "from dataloaders import digits,", "from dataloaders import throwaway_data, digits,", 1
        )
    )

    listing = run(repo, "main.py", "list")
    assert listing.returncode == 0 and "throwaway" in listing.stdout and "throwaway_digits" in listing.stdout
    stale = run(
        repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/experiment/test_config.py", "-k", "docs_config"
    )
    assert stale.returncode == 1 and "throwaway_weight" in stale.stdout  # the docs check sees the new key
    keys = run(repo, "main.py", "keys", "--markdown")
    assert keys.returncode == 0
    (repo / "docs" / "config.md").write_text(keys.stdout)
    collected = run(
        repo, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/methods/test_methods.py"
    )
    picked = [line for line in collected.stdout.splitlines() if "[throwaway]" in line]
    assert len(picked) == 2, collected.stdout[-2000:]  # its run + chaining, and its config + docstring
    checks = run(
        repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "throwaway or docs_config",
        "tests/experiment/test_config.py",
        "tests/methods/test_methods.py::test_every_method_has_a_digits_config_and_a_description",
        "tests/dataloaders/test_dataloaders.py",
    )  # fmt: skip
    # the docs and the method's config and docstring pass; the data set's smoke test asks for the one thing left:
    # a writer of its on-disk format (docs/where-things-go.md)
    assert "1 failed, 2 passed" in checks.stdout, checks.stdout[-3000:]
    assert "data set 'throwaway_digits' has no writer of its on-disk format here" in checks.stdout
