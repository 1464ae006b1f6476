"""The one formatter of user templates (caption templates, class prompts): plain ``{name}`` fields only.

A template given by a user (``--caption-template``, ``--templates`` files, ``--template``) is text with
fields: ``"a photo of a {class_name}."``, or ``"a photo of a {}."`` where the field is the positional one.
``str.format`` would also run whatever else a field may hold: a format width (``{class_name:>900000000}``
built a 900-million-character string per row, 3.7 GB, and never ended), a conversion (``{x!r}``), attribute
or index access (``{x.__class__}``, ``{x[0]}``). Here a template is parsed once with
:class:`string.Formatter` and refused unless every field is a plain known name; filling it is then a plain
concatenation of its pieces, so its output is its literal text plus the values, nothing more. ``{{`` and ``}}``
stay the literal braces, as in ``str.format``. ::

    pieces = parse_template("a photo of a {class_name}.", ["class_name"], what="caption template")
    fill_template(pieces, {"class_name": "daisy"})          # 'a photo of a daisy.'
"""

from __future__ import annotations

import string
from typing import Any, Collection, Mapping

from .errors import RecoError

#: A parsed template: ``(literal text, field name or None)`` pieces; ``""`` is the positional field ``{}``.
Pieces = tuple[tuple[str, "str | None"], ...]

_RULE = "templates take plain {name} fields only (no format spec, conversion, attribute or index)"


def _show(name: str, conv: str | None, spec: str) -> str:
    return "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"


def parse_template(template: str, fields: Collection[str], *, what: str = "template", expected: str | None = None,
                   error: type[RecoError] = RecoError) -> Pieces:
    """Parse ``template`` into pieces, refusing anything but plain fields named in ``fields``.

    Parameters
    ----------
    template : str
    fields : collection of str
        The accepted field names; ``""`` accepts the positional field ``{}``.
    what : str
        How messages name the template (``"caption template"``, ``"--template"``).
    expected : str, optional
        How messages describe the accepted names (default: the list of ``fields``).
    error : RecoError subclass
        The error raised, one line naming the template and the field.

    Returns
    -------
    Pieces
        ``(literal, field or None)`` for :func:`fill_template`.
    """
    if not isinstance(template, str):
        raise error(f"{what}: expected a string, got {type(template).__name__}")
    where = f"{what} {template!r:.200}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone brace
        raise error(f"{where}: {exc} (use {{{{ and }}}} for literal braces)") from None
    pieces = []
    for literal, name, spec, conv in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        shown = _show(name, conv, spec)
        if spec or conv:
            raise error(f"{where}: field {shown!r:.80} has a {'format spec' if spec else 'conversion'}; {_RULE}")
        if name not in fields:
            if any(c in name for c in ".["):
                raise error(f"{where}: field {shown!r:.80} uses attribute or index access; {_RULE}")
            want = expected or "one of " + ", ".join("{}" if f == "" else "{" + f + "}" for f in sorted(fields))
            raise error(f"{where} names field {shown!r:.80}, expected {want}")
        pieces.append((literal, name))
    return tuple(pieces)


def fill_template(pieces: Pieces, values: Mapping[str, str]) -> str:
    """The text of parsed ``pieces`` with each field replaced by ``values[name]`` (``str()`` of it)."""
    return "".join(literal + ("" if name is None else str(values[name])) for literal, name in pieces)


def template_fields(pieces: Pieces) -> list[str]:
    """The field names of parsed ``pieces``, in order (``""``: the positional field)."""
    return [name for _, name in pieces if name is not None]


#: the field a class prompt holds exactly once, where the class name goes: ``{}`` (or ``{class_name}``)
CLASS_FIELDS = ("", "class_name")


def parse_class_template(template: Any, where: str = "templates") -> Pieces:
    """A class prompt parsed by the one template formatter (this module): plain text and exactly
    one plain ``{}`` (or ``{class_name}``) field; a format spec (``{:>900000000}``), a conversion, another field or
    a lone brace is refused with one line naming the template."""
    if not isinstance(template, str):
        raise RecoError(f"{where}: template {template!r:.80} must be a string with '{{}}' where the class name goes")
    pieces = parse_template(template, CLASS_FIELDS, what=f"{where}: template",
                            expected="{} (where the class name goes)")
    if len(template_fields(pieces)) != 1:
        raise RecoError(f"{where}: template {template!r:.200} must contain '{{}}' exactly once (where the class "
                        "name goes)")
    return pieces


def fill_class(pieces: Pieces, class_name: str) -> str:
    """The prompt of one class from a parsed class template."""
    return fill_template(pieces, {"": class_name, "class_name": class_name})


def check_templates(templates: Any, where: str = "templates") -> tuple[str, ...]:
    """Refuse an empty set or a template that is not plain text with exactly one plain ``{}`` (one-line
    :class:`RecoError`, see :func:`parse_class_template`)."""
    if isinstance(templates, str) or not templates:
        raise RecoError(f"{where}: expected a non-empty list of templates, got {templates!r:.200}")
    out = []
    for t in templates:
        parse_class_template(t, where)
        out.append(t)
    return tuple(out)
