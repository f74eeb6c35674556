"""mkdocs hooks: the README becomes the site's guide page (``readme.md``), and links between the README and docs/
that work on GitHub work on the site too."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

README = Path(__file__).resolve().parent.parent / "README.md"


def on_files(files: Files, config) -> Files:
    """Add the README as ``readme.md``."""
    files.append(File.generated(config, "readme.md", content=README.read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """On the README page, ``docs/x.md`` is ``x.md``; on the other pages, ``../README.md`` is ``readme.md``."""
    if page.file.src_uri == "readme.md":
        return re.sub(r"\]\(docs/", "](", markdown)
    return markdown.replace("](../README.md", "](readme.md")
