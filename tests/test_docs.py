"""README.md and docs/*.md: local links resolve; the README stays short."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
  """Markdown without fenced code blocks and code spans."""
  return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(page: Path) -> list[str]:
  return _LINK.findall(_prose(page.read_text()))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # Link text only.
  text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
  return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
  return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", page.read_text()))}


def _local(link: str) -> bool:
  return not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I)  # http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_local_link_resolves(page):
  broken = []
  for link in filter(_local, _links(page)):
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
      broken.append(f"{link} (no such file)")
    elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
      broken.append(f"{link} (no heading #{anchor} in {target.name})")
  assert not broken, f"{page.relative_to(REPO)}: " + ", ".join(broken)


def test_the_checker_sees_links():
  assert "docs/configs.md" in _links(REPO / "README.md")
  assert _slug("Faithfulness to Sohn et al. 2021") == (
    "faithfulness-to-sohn-et-al-2021"
  )
  assert _slug("`dgad` (discriminative-generative)") == (
    "dgad-discriminative-generative"
  )


def test_the_readme_links_every_docs_page():
  linked = {
    (REPO / link.partition("#")[0]).resolve()
    for link in _links(REPO / "README.md")
    if _local(link)
  }
  missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
  assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_is_a_front_door():
  lines = len((REPO / "README.md").read_text().splitlines())
  assert lines <= README_MAX_LINES, (
    f"README.md has {lines} lines; move detail to docs/ (at most "
    f"{README_MAX_LINES})."
  )
