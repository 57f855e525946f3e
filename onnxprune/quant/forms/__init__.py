"""The quantized forms, one module each, found by themselves: a module that declares ``FORM = Form(...)``
(``quant/form.py``) is a form; a kind declared twice fails at import. A new form is one new module (and its
test)."""

from __future__ import annotations

import importlib
import pkgutil

from ..form import Form


def _discover() -> dict[str, Form]:
    found: dict[str, Form] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        form = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORM", None)
        if isinstance(form, Form):
            if form.kind in found:
                raise ValueError(f"quantized form {form.kind!r} is declared twice")
            found[form.kind] = form
    return found


FORMS: dict[str, Form] = _discover()
