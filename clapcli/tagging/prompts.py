"""Prompt templates: each label is written into one or more sentences before text encoding."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError

# The zero-shot prompt of the LAION-CLAP paper's evaluation protocol.
DEFAULT_TEMPLATE = "This is a sound of {}."


class TemplateError(UsageError):
    """A prompt template without exactly one `{}` slot for the label."""


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """The templates to use (the default when none are given), each with exactly one `{}`, no repeats."""
    if not templates:
        return [DEFAULT_TEMPLATE]
    checked: list[str] = []
    for template in templates:
        if not isinstance(template, str):
            raise TemplateError(f"a prompt template must be a string, got {type(template).__name__}")
        slots = template.count("{}")
        if slots != 1:
            raise TemplateError(
                f"prompt template {template!r} has {slots} '{{}}' slots; it needs exactly one, "
                "where the label goes (e.g. 'This is a sound of {}.')"
            )
        if template in checked:
            raise TemplateError(f"prompt template {template!r} is given twice")
        checked.append(template)
    return checked


def render(templates: Sequence[str], labels: Sequence[str]) -> list[str]:
    """All prompts, template-major: prompt t * len(labels) + l is template t filled with label l."""
    # str.replace rather than str.format: labels and templates may contain other braces.
    return [template.replace("{}", label) for template in check_templates(templates) for label in labels]
