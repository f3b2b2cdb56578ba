"""MkDocs hooks of the documentation site (mkdocs.yml: ``hooks``).

- The page ``commands.md``: its ``<!-- options -->`` line is replaced by every command's options, read
  from the command functions themselves (:func:`deconvnet.options.options_of` for each name in
  :data:`deconvnet.cli.COMMANDS`), the same source ``deconvnet COMMAND --help`` is built from, so the
  page cannot drift from the CLI.
- The API reference: the package's docstrings use reST roles (``:func:`load_subject```); mkdocstrings
  renders them as text, so the role names (and the ``~`` of a shortened path) are dropped and the
  code kept.

Run it alone to print the generated options: ``python docs/gen_options.py``.
"""
from __future__ import annotations

import inspect
import re

MARKER = "<!-- options -->"
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):(?=<code>)")
_ROLE_TEXT = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


def _markdown(text: str) -> str:
    """Docstring text (reST flavoured) as Markdown: ``code`` -> `code`, roles dropped."""
    text = _ROLE_TEXT.sub(lambda m: f"`{m.group(1)}`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """Help text inside a Markdown table cell: characters Markdown would read as markup escaped."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "*_[]`":
        text = text.replace(ch, "\\" + ch)
    return text


def _value(option) -> str:
    """What follows the flag on the command line: ``N``, ``A,B,...``, ``{x,y}``, or nothing for switches."""
    import typing

    if option.switch:
        return ""
    spec = option.spec
    if spec.choices:
        return "{" + ",".join(spec.choices) + "}"
    if spec.metavar:
        return spec.metavar + (" ..." if spec.files else "")
    kind = option.kind
    origin = typing.get_origin(kind)
    if origin in (list, tuple) or kind is list:
        inner = (typing.get_args(kind) or (str,))[0]
        return {int: "N,N,...", float: "X,X,..."}.get(inner, "A,B,...")
    return {int: "N", float: "X"}.get(kind, option.name.upper())


def _default(option) -> str:
    from dataclasses import MISSING

    if option.default is MISSING:
        return "required"
    if option.switch or option.default is None or option.default == ():
        return ""
    value = option.default
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"`{value}`"


def options_markdown() -> str:
    """Every command of ``deconvnet --help``: its summary, description and one table row per option."""
    from deconvnet import commands
    from deconvnet.cli import ALIASES, COMMANDS
    from deconvnet.options import model_options, options_of, summary

    old = {new: [name for name, n in ALIASES.items() if n.replace("_", "-") == new] for new in ALIASES.values()}
    parts = ["Every command below is `deconvnet COMMAND [OPTIONS]`; `deconvnet COMMAND --help` prints the same list.",
             "The model options (`--model`, `--weights`, `--classes`, `--preprocess`, ...) are those of "
             "[the model under study](your-model.md).", ""]
    index = ", ".join(f"[`{c.replace('_', '-')}`](#{c.replace('_', '-')})" for c in COMMANDS)
    parts += [f"Commands: {index}.", ""]
    for name in COMMANDS:
        function = getattr(commands, name)
        command = name.replace("_", "-")
        doc = inspect.getdoc(function) or ""
        body = doc.split("\n", 1)[1] if "\n" in doc else ""
        body = body.split("\nArgs:", 1)[0].strip()
        parts += [f"## {command}", "", _markdown(summary(function)) + "."]
        if body:
            parts += ["", _markdown(body)]
        if old.get(command):
            parts += ["", "Earlier name, still accepted: " + ", ".join(f"`{o}`" for o in old[command]) + "."]
        shared = any(p.kind is p.VAR_KEYWORD and p.name == "model"
                     for p in inspect.signature(function).parameters.values())
        model_names = {o.name for o in options_of(model_options)} if shared else set()
        own = []
        for o in options_of(function):
            if o.name in model_names:
                continue
            value = _value(o)
            flag = f"`{o.flag}{' ' + value if value else ''}`"
            own.append(f"| {flag} | {_cell(o.help)} | {_default(o)} |")
        if own:
            parts += ["", "| option | meaning | default |", "|---|---|---|", *own]
        if shared:
            parts += ["", "Plus the [model options](#model-options)."]
        parts.append("")
    parts += ["## Model options", "",
              "The options naming the model under study, shared by every command that analyses one:", "",
              "| option | meaning | default |", "|---|---|---|"]
    for o in options_of(model_options):
        value = _value(o)
        parts.append(f"| `{o.flag}{' ' + value if value else ''}` | {_cell(o.help)} | {_default(o)} |")
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "commands.md" and MARKER in markdown:
        return markdown.replace(MARKER, options_markdown())
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.startswith("api/"):
        return _ROLE.sub("", html).replace("<code>~", "<code>")
    return html


if __name__ == "__main__":
    print(options_markdown())
