"""Make megatrain importable from this checkout without building it: ``python
benchmarks/link_megatrain.py SITE`` fills ``SITE/megatrain`` with links to the sources, laid out as
setup.py installs them (``megatrain/`` plus the top-level folders it maps into the namespace, read
from setup.py's ``SUBPACKAGE_DIRS``), so that ``PYTHONPATH=SITE`` imports this tree's code.

Used on the lent GPU machines, where pip cannot fetch a build backend and the image's setuptools may
be too old to build a wheel offline (setuptools < 70.1 needs the ``wheel`` package for that).
"""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def subpackage_dirs(setup_py: Path) -> dict[str, str]:
    """setup.py's ``SUBPACKAGE_DIRS`` literal: package name -> folder, e.g. megatrain.kernels -> kernels."""
    for node in ast.parse(setup_py.read_text()).body:
        names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "SUBPACKAGE_DIRS" in names:
            return ast.literal_eval(node.value)
    raise SystemExit(f"no SUBPACKAGE_DIRS in {setup_py}")


def link(site: Path) -> Path:
    package = site / "megatrain"
    package.mkdir(parents=True, exist_ok=False)
    for entry in (REPO / "megatrain").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in subpackage_dirs(REPO / "setup.py").items():
        (package / name.split(".", 1)[1]).symlink_to(REPO / folder)
    return package


if __name__ == "__main__":
    print(f"linked {link(Path(sys.argv[1]))}")
