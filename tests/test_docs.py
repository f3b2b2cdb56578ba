"""The documentation: the MkDocs site builds with warnings as errors (a broken link, anchor or API
reference fails), every internal link of the built site resolves, the README's links resolve, the
options page lists every command, and the tutorial notebook runs (at 64 px, on a few photos)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


class _Links(HTMLParser):
    """The links (href of a/link, src of img/script) and element ids of one HTML page."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        target = attrs.get("href") if tag in ("a", "link") else attrs.get("src") if tag in ("img", "script") else None
        if target:
            self.links.append(target)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def _broken_links(site: Path) -> list[str]:
    """Every internal link of the built site that does not resolve to a file (and anchor, if given)."""
    pages = {path: _parse(path) for path in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        if page.name == "404.html":
            continue  # served at any address, so its links are absolute by design
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//"):
                continue  # external (http, mailto, data, javascript)
            if not parts.path:
                target = page
            else:
                target = (page.parent / unquote(parts.path)).resolve()
                if target.is_dir() or parts.path.endswith("/"):
                    target = target / "index.html"
            where = f"{page.relative_to(site)}: {link}"
            if not target.is_file() or site.resolve() not in target.resolve().parents:
                broken.append(f"{where} (no file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where} (no anchor)")
    return broken


def test_docs_site_builds_strict_and_every_internal_link_resolves(tmp_path):
    missing = _missing("mkdocs", "mkdocstrings", "mkdocstrings_handlers")
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    print(f"mkdocs build: {seconds:.1f} s")
    for page in ("index.html", "commands/index.html", "api/per-image/index.html", "tutorial.ipynb"):
        assert (site / page).is_file(), page
    assert _broken_links(site) == []
    api = (site / "api" / "per-image" / "index.html").read_text()
    assert 'id="deconvnet.occlusion.occlusion"' in api  # the reference is generated from the docstrings
    assert ":func:" not in api and ":class:" not in api  # reST roles are dropped by the hook


def test_options_page_lists_every_command_and_option():
    spec = importlib.util.spec_from_file_location("gen_options", DOCS / "gen_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from deconvnet import commands
    from deconvnet.cli import COMMANDS
    from deconvnet.options import options_of

    page = module.options_markdown()
    for name in COMMANDS:
        assert f"\n## {name.replace('_', '-')}\n" in page, name
        for option in options_of(getattr(commands, name)):
            assert f"`{option.flag}" in page, (name, option.flag)


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines: details belong in docs/"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        parts = urlsplit(target)
        if parts.scheme:
            continue
        assert (ROOT / unquote(parts.path)).exists(), f"README.md links to {target}, which does not exist"


def test_tutorial_notebook_runs(tmp_path):
    missing = _missing("nbclient", "nbformat", "ipykernel", "skimage", "torchvision")
    if missing:
        pytest.skip(f"the notebook needs {', '.join(missing)} (pip install -e '.[docs]' and torchvision)")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit docs/tutorial.ipynb without outputs"
    start = time.monotonic()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"tutorial.ipynb: {time.monotonic() - start:.1f} s")
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the gallery, the projection, occlusion and invariance are drawn inline"
    assert any("text/html" in o.get("data", {}) and "verdict" in o.data["text/html"] for o in outputs)
