"""README.md and docs/*.md say only what runs: every ```python block is executed, every link stays inside the repo.

Rules for authors (also in docs/README.md):

* The ```python blocks of one page run **in order, in one namespace**, in a fresh temporary working folder
  (so a block may use names an earlier block on the same page defined, and files it writes vanish). Shipped
  files are reached through ``reco_ref.paths.weights_file(...)``, not relative paths.
* A block that cannot run offline here (it needs a GPU, PyTorch, a cluster, a real CLIP) is marked by the line
  ``<!-- no-run -->`` right above its opening fence. Use it sparingly: a marked block is text nobody checks.
* Links: relative links must name files that exist; no links to anything outside the repository.
* New pages are picked up automatically (``docs/*.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NO_RUN = "<!-- no-run -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number of the opening fence, code, runnable)`` for each ```python block of a Markdown text."""
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        out.append((line, m.group(1), before != NO_RUN))
    return out


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_block_parser():
    text = "a\n```python\nx = 1\n```\n\n<!-- no-run -->\n```python\nimport cuda_only\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", True), (7, "import cuda_only\n", False)]


RUNNABLE = [p for p in PAGES if any(ok for _l, _c, ok in python_blocks(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[_rel(p) for p in RUNNABLE])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    for line, code, runnable in python_blocks(page.read_text(encoding="utf-8")):
        if not runnable:
            continue
        try:
            exec(compile(code, f"{_rel(page)}:{line}", "exec"), ns)
        except Exception as exc:  # name the page and line: that is where the reader will look
            raise AssertionError(f"{_rel(page)}, ```python block at line {line}: {type(exc).__name__}: {exc}") from exc


def test_readme_and_docs_have_runnable_python():
    """The README and the reference pages show Python that this suite runs (not only marked-off text)."""
    assert ROOT / "README.md" in RUNNABLE
    skipped = [(_rel(p), line) for p in PAGES for line, _c, ok in python_blocks(p.read_text(encoding="utf-8")) if not ok]
    ran = sum(ok for p in PAGES for _l, _c, ok in python_blocks(p.read_text(encoding="utf-8")))
    assert ran > len(skipped), f"more blocks marked {NO_RUN} ({skipped}) than run ({ran})"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_links_stay_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    outside = sorted(set(re.findall(r"\b(?:https?|ftp)://\S+", text)))
    assert not outside, f"{_rel(page)}: links outside the repository: {outside}"
    for target in LINK.findall(text):
        if target.startswith(("#", "mailto:")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{_rel(page)}: link to {target}, but {path} does not exist"


def test_readme_commands_are_what_ci_runs():
    """The README's second command is, character for character, the command .ci/run executes."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert block[0].startswith('python3 -m pip install -e ".[demo]" && reco-ref demo')
    assert block[1].split("  #", 1)[0].rstrip() == ci


def test_readme_stays_a_front_page():
    """The README is read in five minutes; reference material belongs in docs/<topic>.md (issue 12)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < 250, f"README.md has {lines} lines (front page budget: < 250); move reference material to docs/"
    assert "<!-- RESULTS -->" in (ROOT / "README.md").read_text(encoding="utf-8")
