"""Templates for generated text files: one Jinja environment for all of them.

    singularity/...    the job's batch script (the build's install script is the
                       apptainer adapter's own)
    mail/...           emails (gateway/templates/mail; the first line is the subject)

Web pages are Flask's own (gateway/templates, autoescaped); these are plain text,
so every value that reaches a shell goes through a filter: ``q`` shell-quotes,
``directive`` refuses what could end or inject an ``#SBATCH`` line.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2

SINGULARITY_DIR = Path(__file__).resolve().parents[2] / "singularity"
MAIL_DIR = Path(__file__).resolve().parents[1] / "templates" / "mail"


def _directive(value: object) -> str:
    text = str(value)
    if not text or re.search(r"\s|['\"\\#]", text):
        raise ValueError(f"unsafe value for an #SBATCH line: {text!r}")
    return text


text = jinja2.Environment(
    loader=jinja2.PrefixLoader({
        "singularity": jinja2.FileSystemLoader(SINGULARITY_DIR),
        "mail": jinja2.FileSystemLoader(MAIL_DIR),
    }),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
text.filters["q"] = lambda value: shlex.quote(str(value))
text.filters["directive"] = _directive


def render(name: str, **values: object) -> str:
    """Render ``name`` ("singularity/job.sbatch.j2", "mail/queued.txt")."""
    return text.get_template(name).render(**values)
