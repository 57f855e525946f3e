"""Real English text already on the machine, from two unrelated sources, for calibration and evaluation.

* Calibration: the prose of the Python Language Reference and library manual that CPython ships as
  ``pydoc_data.topics`` (written by the Python documentation authors; technical English).
* Evaluation: the licence texts that Debian ships in ``/usr/share/common-licenses`` (GPL, LGPL, GFDL, MPL,
  Apache, Artistic: legal English, written by other people for another purpose).

Neither is generated, and they share neither authors nor subject, so a method that only fits its
calibration text shows it on the evaluation text. Code samples, grammar rules, headings and numbered
clauses are left out: only sentences of running prose are kept.

    python tools/texts.py      # counts, and a few sentences of each
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_WORD = re.compile(r"[A-Za-z]+")


def _paragraphs(text: str, indented_is_code: bool = True) -> list[str]:
    """Blank-line separated paragraphs; with ``indented_is_code``, a paragraph that starts indented (a code
    sample or a grammar rule in the Python docs) is left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or (indented_is_code and lines[0].startswith((" ", "\t"))):
            continue
        out.append(" ".join(line.strip() for line in lines))
    return out


def _prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60 or not sentence.endswith((".", "?", "!")):
        return False
    letters = sum(len(w) for w in _WORD.findall(sentence))
    if letters < 0.75 * len(sentence.replace(" ", "")):          # code, numbers, markup
        return False
    return not any(mark in sentence for mark in ("::", ">>>", "==", "()", "[]", "{}", "http", "www.", "@"))


def sentences(paragraphs: list[str]) -> list[str]:
    out, seen = [], set()
    for p in paragraphs:
        p = re.sub(r"\s+", " ", p).strip()
        p = re.sub(r"^(\d+[.)]|\([a-z0-9]+\)|[a-z][.)])\s+", "", p)     # clause numbers
        for s in _SENTENCE_END.split(p):
            s = s.strip()
            if _prose(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def calibration_sentences() -> list[str]:
    """Sentences of the Python documentation's prose, in a fixed order."""
    from pydoc_data.topics import topics
    return sentences([p for key in sorted(topics) for p in _paragraphs(topics[key])])


def evaluation_sentences() -> list[str]:
    """Sentences of the licence texts, in a fixed order (symbolic links, which repeat a text, skipped)."""
    if not LICENSES.is_dir():
        raise SystemExit(f"{LICENSES} is missing: the evaluation text is Debian's licence texts "
                         "(package base-files)")
    paras = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_file() and not path.is_symlink():
            paras += _paragraphs(path.read_text(errors="replace"), indented_is_code=False)
    return sentences(paras)


def calibration_text() -> str:
    return " ".join(calibration_sentences())


def evaluation_text() -> str:
    return " ".join(evaluation_sentences())


def main() -> int:
    for name, got in (("calibration (Python docs)", calibration_sentences()),
                      ("evaluation (licences)", evaluation_sentences())):
        words = sum(len(s.split()) for s in got)
        print(f"{name}: {len(got)} sentences, {words} words")
        for s in got[:: max(1, len(got) // 4)][:4]:
            print(f"   {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
