"""The README's promises that code can check: its first two commands and its Python API example run as
written."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """The indented command lines of the README's opening, before its first section."""
    head = README[:README.index("\n## ")]
    return [ln.strip() for ln in head.splitlines() if ln.startswith("    python3 -m venv")]


def _block(section: str) -> str:
    """The first indented code block under ``section``."""
    lines = README[README.index(section):].splitlines()[1:]
    code, started = [], False
    for ln in lines:
        if ln.startswith("    ") or (started and not ln.strip()):
            code.append(ln[4:])
            started = True
        elif started:
            break
    return "\n".join(code)


def test_the_first_two_commands_install_and_prune_and_test(tmp_path):
    """The install steps are those .ci/run takes from scratch on every change; what follows them (the
    prune, the test command) is run here as written, with the installed command line."""
    first, second = _commands()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert first.startswith(venv + "pip install . && onnxprune ")
    assert second == venv + 'pip install ".[test]" && python -m pytest -q'
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q ".[test]"' in ci and "python -m pytest -q" in ci
    args = shlex.split(first.split(" && ")[-1])
    assert args[0] == "onnxprune"
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "bert-ts.onnx", tmp_path / "models")
    r = subprocess.run([sys.executable, "-m", "onnxprune.cli", *args[1:]], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(str(tmp_path / args[args.index("-o") + 1]), full_check=True)
    assert "pruned == masked original: max abs error 0.00e+00" in r.stdout


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    source = _block("## Python API")
    assert "prune_model(" in source and "PruneOptions(" in source
    scope = {}
    exec(compile(source, "README.md (Python API)", "exec"), scope)
    assert scope["result"].kept == {0: (1, 3), 1: (0, 2)} and scope["result"].max_error == 0.0
    assert scope["again"].options.min_heads == 2 and scope["r"].ideal > 1
    assert (tmp_path / "bert-half.onnx").exists()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(files) -> list[str]:
    broken = []
    for f in files:
        for target in re.findall(r"\]\(([^)\s]+)\)", f.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            dest = f.parent / path if path else f
            if not dest.exists():
                broken.append(f"{f.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                heads = {_slug(ln.lstrip("#")) for ln in dest.read_text().splitlines() if ln.startswith("#")}
                if anchor not in heads:
                    broken.append(f"{f.name}: {target} (no such heading)")
    return broken


def test_every_link_of_the_readme_and_docs_leads_somewhere(tmp_path):
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert _broken_links(files) == []
    planted = tmp_path / "a.md"                       # the check itself finds a dead anchor and a missing file
    planted.write_text("# Title\n[ok](#title) [dead](#cutting-inside-the-heads) [gone](docs/none.md)\n")
    assert _broken_links([planted]) == ["a.md: #cutting-inside-the-heads (no such heading)",
                                        "a.md: docs/none.md (no such file)"]
