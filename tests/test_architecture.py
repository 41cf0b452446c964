"""The architecture of docs/architecture.md holds: import rules, the lazy front, the public names, doc references."""
import re
import subprocess
import sys
from pathlib import Path

import nbformat

import mirlab

ROOT = Path(__file__).resolve().parents[1]
# a reference to a docs page, optionally with a section: docs/mir.md, 'The 3σ rule'  (either kind of quotes)
DOC_REFERENCE = re.compile(r"docs/([\w-]+\.md)(?:\s*,\s*[\"'“‘]([^\"'”’\n]+)[\"'”’])?")


def test_import_contracts_are_kept():
    """`lint-imports` checks the contracts of pyproject.toml ([tool.importlinter]) on the real import graph."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), f"{lint_imports} not found: install the test extra (pip install -e .[test])"
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"import contracts broken:\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout


def test_import_mirlab_does_not_load_torch():
    code = "import sys, mirlab; assert 'torch' not in sys.modules, 'import mirlab loaded torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves():
    missing = []
    for name in mirlab.__all__:
        try:
            getattr(mirlab, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err}")
    assert not missing, "mirlab.__all__ names that do not resolve:\n" + "\n".join(missing)
    assert sorted(dir(mirlab)) == sorted(mirlab.__all__)


def _headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip().replace("`", "") for line in page.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def _citing_texts():
    """(where, text) of every docstring/comment source and notebook cell that may cite docs/."""
    for folder in ("mirlab", "tests", "benchmarks", "experiments", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != Path(__file__).name:
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            yield path.relative_to(ROOT), cell.source
    for name in ("README.md", "Makefile", "pyproject.toml"):
        yield Path(name), (ROOT / name).read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        yield page.relative_to(ROOT), page.read_text(encoding="utf-8")


def test_references_to_docs_point_to_existing_pages_and_sections():
    broken, seen = [], 0
    for where, text in _citing_texts():
        for page, section in DOC_REFERENCE.findall(text):
            seen += 1
            path = ROOT / "docs" / page
            if not path.is_file():
                broken.append(f"{where}: docs/{page} does not exist")
            elif section and section.replace("`", "") not in _headings(path):
                broken.append(f"{where}: docs/{page} has no section {section!r}")
    assert seen > 0, "no docs/ reference found: the pattern no longer matches how the code cites docs"
    assert not broken, "\n".join(broken)
