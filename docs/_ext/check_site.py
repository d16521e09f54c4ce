"""Check a built site for what it would fetch from elsewhere: scripts, stylesheets and fonts from another host.

    python docs/_ext/check_site.py SITE_DIR    # exits 1, listing each, if a page or stylesheet needs the network

The site must read the same without a network: its formulas are rendered by a local MathJax (docs/_ext/hooks.py)
and its text in the system's fonts (mkdocs.yml: ``font: false``). Links to other sites are fine: they are read only
when followed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# <script src="...">, <link ... href="..."> (stylesheets, fonts, preloads), CSS @import and url(...) in stylesheets
_FETCHES = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)", re.I),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']([^\"']+)", re.I),
    re.compile(r"@import\s+(?:url\()?[\"']?([^\"')\s;]+)", re.I),
    re.compile(r"\burl\(\s*[\"']?([^\"')\s]+)", re.I),
]
_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //host


def external_fetches(site: Path) -> list[str]:
    """Every place a page or stylesheet of the site loads something from another host, as "file: url"."""
    found = []
    for path in sorted([*site.rglob("*.html"), *site.rglob("*.css")]):
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in _FETCHES:
            if path.suffix == ".html" and pattern.pattern.startswith(r"\burl"):
                continue  # url(...) in a page's prose is text, not a fetch
            for url in pattern.findall(text):
                if _REMOTE.match(url.strip()) and not _is_link_only(text, url):
                    found.append(f"{path.relative_to(site)}: {url}")
    return list(dict.fromkeys(found))  # a url matched twice (@import url(...)) is one fetch


def _is_link_only(text: str, url: str) -> bool:
    """A <link rel="canonical"> (or alternate) names the page's address; the browser does not fetch it."""
    tag = re.search(r"<link\b[^>]*" + re.escape(url) + r"[^>]*>", text)
    return (
        tag is not None and re.search(r"rel\s*=\s*[\"'](?:canonical|alternate|me)[\"']", tag.group(0), re.I) is not None
    )


def main(argv: list[str]) -> int:
    site = Path(argv[1])
    found = external_fetches(site)
    for line in found:
        print(f"fetched from another host: {line}", file=sys.stderr)
    print(f"{site}: {'no' if not found else len(found)} external fetches")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
