"""Hostile but fair use, as a careful QA engineer runs it: broken inputs, colliding paths, faults between
renames, signals, full disks, closed pipes and contradictory options. Every case ends in one of three
ways: a correct result, or a one-line error with its documented exit code, and in every case the input
files byte-identical and no file created or changed besides the ones asked for."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import prune_model
from onnxprune.api import count_result_macs, inspect_model, score_model
from onnxprune.cli import main
from onnxprune.errors import InputError, ModelTypeError, PlanError
from onnxprune.model.external import data_files
from onnxprune.inputs import synth_inputs
from onnxprune.verify import max_abs_diff, run, worst_of

from conftest import MODELS, cli, plant_in_rewrite

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench_scale import build  # noqa: E402  (numpy and onnx only)

BERT = MODELS / "bert-ts.onnx"      # position table of 64: runs at seq <= 64
VIT = MODELS / "vit-ts.onnx"


@pytest.fixture
def inproc(capsys):
    """The command line in this process (much faster than a fresh interpreter): anything but a clean exit
    code, a traceback included, fails the test as an exception."""
    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


# A command line run in a fresh interpreter with a fault planted first (PATCH is Python run before main).
DRIVER = """
import errno, os, signal, sys
import onnx
import onnxprune.files as io     # the files written into place (the model's too) are published through it
{patch}
from onnxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def driven(patch: str, *args):
    # SIGINT as a terminal sends it: a suite started in the background (``cmd &`` in a script) hands its
    # children SIGINT ignored, which Python then keeps ignoring, so Ctrl-C could not be tested there
    return subprocess.run([sys.executable, "-c", DRIVER.format(patch=patch), *map(str, args)],
                          capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(r, code: int, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def work(tmp_path):
    shutil.copy(BERT, tmp_path / "bert.onnx")
    shutil.copy(VIT, tmp_path / "vit.onnx")
    return tmp_path


@pytest.fixture
def ext(tmp_path):
    """A model with external data: src/model.onnx + src/model.onnx.data (3 layers, 8 heads of 8)."""
    src = tmp_path / "src"
    src.mkdir()
    return build(src, 0, hidden=64, heads=8, ffn=128, vocab=300, layers=3)


# ------------------------------------------------------------------ 1. NaN is never "exact"
def test_verification_fails_on_any_non_finite_difference():
    a = {"y": np.array([1.0, 2.0, np.inf], np.float32)}
    assert max_abs_diff(a, {"y": np.array([1.0, 2.0, np.inf], np.float32)}) == 0.0      # equal infinities agree
    for bad in ([1.0, np.nan, np.inf], [1.0, 2.0, -np.inf], [1.0, 2.0, 5.0]):
        err = max_abs_diff(a, {"y": np.array(bad, np.float32)})
        assert not err <= 1e-4, bad
    assert not max_abs_diff({"y": np.array([np.nan])}, {"y": np.array([np.nan])}) <= 1e-4   # NaN in both
    assert np.isnan(worst_of([0.0, float("nan"), 1.0]))           # builtin max(0.0, nan, 1.0) gives 1.0
    assert worst_of([0.25, 0.5]) == 0.5


def test_a_planted_nan_fails_verification_and_writes_nothing(work, monkeypatch, capsys):
    """A rewrite that produced NaN weights: the check sees it, exit 6, no file."""
    def nan_column(w):
        w[:, 0] = np.nan                                     # one output feature of a projection
        return w

    plant_in_rewrite(monkeypatch, nan_column)
    before = snapshot(work)
    code = main([str(work / "bert.onnx"), "--ratio", "0.5", "--report", str(work / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 6 and "NaN" in err and len(err.splitlines()) == 1
    assert snapshot(work) == before
    monkeypatch.undo()
    assert main([str(work / "bert.onnx"), "--ratio", "0.5", "--dry-run"]) == 0     # without the fault: exact


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibration_data_must_be_finite(work, bad):
    data = synth_inputs(onnx.load(str(VIT)), batch=8)
    data["pixel_values"][3, 1, 2, 2] = bad
    np.savez(work / "c.npz", **data)
    before = snapshot(work)
    r = cli(work / "vit.onnx", "--ratio", "0.5", "--importance", "weights", "--calib", work / "c.npz",
            "--compensate")
    one_line_error(r, 2, "pixel_values", "finite")
    assert snapshot(work) == before


def test_compensation_that_overflows_is_refused(work):
    """Finite data that the model overflows on: the refit is not finite, and nothing is written."""
    data = synth_inputs(onnx.load(str(VIT)), batch=8)
    data["pixel_values"] = np.clip(data["pixel_values"], -1, 1) * np.float32(3e38)   # finite; its sums are not
    np.savez(work / "c.npz", **data)
    before = snapshot(work)
    r = cli(work / "vit.onnx", "--ratio", "0.5", "--importance", "weights", "--calib", work / "c.npz",
            "--compensate")
    one_line_error(r, 2, "not finite")
    assert snapshot(work) == before


@pytest.mark.parametrize("how", [dict(ratio=0.5), dict(ratio=0.5, scope="global"), dict(threshold=0.5)])
def test_non_finite_scores_are_refused_in_every_scope(how):
    model = onnx.load(str(BERT))
    scores = {0: [1.0, np.nan, 2.0, 3.0], 1: [1.0, 2.0, 3.0, 4.0]}
    with pytest.raises(PlanError, match="head 1 has importance nan"):
        prune_model(model, importance=scores, **how)
    with pytest.raises(PlanError, match="numbers"):
        prune_model(model, importance={0: ["a", "b", "c", "d"]}, **how)


def test_calibrated_scores_that_are_not_finite_are_refused(monkeypatch):
    from dataclasses import replace
    from onnxprune.importance import SOURCES
    monkeypatch.setitem(SOURCES, "activation", replace(SOURCES["activation"], score=lambda ctx: {
        b.index: np.full(b.num_heads, np.nan) for b in ctx.blocks}))
    with pytest.raises(PlanError, match=r"importance nan \(activation\)"):
        prune_model(onnx.load(str(BERT)), 0.5, importance="activation")


# ------------------------------------------------------------------ 2. inputs are never damaged
def test_output_over_the_inputs_data_file_is_refused(ext):
    before = snapshot(ext.parent)
    for args in (["-o", ext.parent / "model.onnx.data"], ["--report", ext.parent / "model.onnx.data"],
                 ["--report", ext], ["-o", ext.parent / "model.onnx.data", "--force"]):
        r = cli(ext, "--ratio", "0.5", *args)
        one_line_error(r, 2, "a file of the input")
        assert snapshot(ext.parent) == before


def test_an_output_whose_data_name_is_the_inputs_gets_another(ext):
    """orig.onnx reads model.onnx.data; -o model.onnx beside it must not write model.onnx.data."""
    orig = ext.parent / "orig.onnx"
    ext.rename(orig)
    before = snapshot(ext.parent)
    r = cli(orig, "--ratio", "0.5", "-o", ext.parent / "model.onnx")
    assert r.returncode == 0, r.stderr
    after = snapshot(ext.parent)
    assert {k: after[k] for k in before} == before                      # the input, byte for byte
    pruned = onnx.load(str(ext.parent / "model.onnx"), load_external_data=False)
    assert [f.name for f in data_files(ext.parent / "model.onnx", pruned)] == ["model.onnx.1.data"]
    onnx.checker.check_model(str(ext.parent / "model.onnx"), full_check=True)
    feeds = synth_inputs(onnx.load(str(orig)))
    assert run(onnx.load(str(orig)), feeds) and run(onnx.load(str(ext.parent / "model.onnx")), feeds)
    assert cli(orig, "--ratio", "0.5", "-o", ext.parent / "model.onnx").returncode == 0   # over itself
    assert snapshot(ext.parent).keys() == {"orig.onnx", "model.onnx.data", "model.onnx", "model.onnx.2.data"}
    assert {k: snapshot(ext.parent)[k] for k in before} == before


def test_json_outputs_never_replace_inputs_or_other_outputs(work, ext, inproc):
    before = snapshot(work)
    cases = [
        [work / "bert.onnx", "--ratio", "0.5", "--report", work / "bert.onnx"],
        [work / "bert.onnx", "--ratio", "0.5", "--report", work / "o.onnx", "-o", work / "o.onnx"],
        [work / "bert.onnx", "--ratio", "0.5", "--report", work / "bert.pruned.onnx"],
        ["score", work / "bert.onnx", "-o", work / "s.onnx", "--json", work / "bert.onnx"],
        ["score", work / "bert.onnx", "-o", work / "s.onnx", "--json", work / "s.onnx"],
        ["bench", work / "bert.onnx", work / "vit.onnx", "--json", work / "vit.onnx"],
        ["bench", work / "bert.onnx", work / "vit.onnx", "--json", work / "bert.onnx"],
    ]
    for args in cases:
        r = inproc(*args)
        assert r.returncode == 2, (args, r.stderr)
        one_line_error(r, 2)
        assert snapshot(work) == before, args
    src = snapshot(ext.parent)
    for args in (["score", ext, "-o", work / "s.onnx", "--json", ext.parent / "model.onnx.data"],
                 ["bench", ext, ext, "--json", ext.parent / "model.onnx.data"]):
        one_line_error(inproc(*args), 2, "a file of the input")
        assert snapshot(ext.parent) == src and snapshot(work) == before


def test_force_replaces_the_input_model_in_place(ext):
    """--force allows the one thing it says: the pruned model replaces the input, and the input's old data
    file, which nothing reads any more, goes."""
    r = cli(ext, "--ratio", "0.5", "-o", ext, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ext.parent.iterdir()) == ["model.onnx", "model.onnx.1.data"]
    q = next(i for i in onnx.load(str(ext)).graph.initializer if i.name == "l0.q.weight")
    assert list(q.dims) == [64, 32]


# ------------------------------------------------------------------ 3. no half files
def test_concurrent_runs_to_one_output_leave_a_complete_pair(ext, tmp_path):
    """Two runs with different plans write one external-data output at once, interleaved at the worst
    point: A moves its data file in, then B publishes all of its output, then A renames its model. Each
    run reserved its own data file name, so A's model, renamed last, reads A's data."""
    out, sync = tmp_path / "out", tmp_path / "sync"
    out.mkdir()
    sync.mkdir()
    wait = ("def wait(name):\n    import pathlib, time\n    t = time.time()\n"
            f"    while not pathlib.Path({str(sync)!r}, name).exists() and time.time() - t < 60:\n"
            "        time.sleep(0.01)\n"
            f"def touch(name):\n    import pathlib\n    pathlib.Path({str(sync)!r}, name).touch()\n"
            "real = io.publish\ncalls = []\n")
    first = wait + ("def publish(tmp, out, **kw):\n    real(tmp, out, **kw)\n    calls.append(out)\n"
                    "    if len(calls) == 1:\n        touch('a-data')\n        wait('b-done')\nio.publish = publish")
    second = wait + ("def publish(tmp, out, **kw):\n    if not calls:\n        wait('a-data')\n    real(tmp, out, **kw)\n"
                     "    calls.append(out)\n    if len(calls) == 2:\n        touch('b-done')\nio.publish = publish")
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER.format(patch=patch), str(ext), "--ratio", ratio,
                               "-o", str(out / "m.onnx")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
             for patch, ratio in ((first, "0.25"), (second, "0.75"))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert (sync / "a-data").exists() and (sync / "b-done").exists()     # they did interleave
    onnx.checker.check_model(str(out / "m.onnx"), full_check=True)
    model = onnx.load(str(out / "m.onnx"))
    q = next(i for i in model.graph.initializer if i.name == "l0.q.weight")
    assert list(q.dims) == [64, 48]                                       # A's plan: 6 of 8 heads
    got = run(model, synth_inputs(model))
    assert all(np.isfinite(v).all() for v in got.values())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # no staging folder left


def test_a_crash_between_the_two_renames_leaves_the_old_pair(ext, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert cli(ext, "--ratio", "0.25", "-o", out / "m.onnx").returncode == 0
    old = snapshot(out)
    feeds = synth_inputs(onnx.load(str(out / "m.onnx")))
    expected = run(onnx.load(str(out / "m.onnx")), feeds)
    # the process dies right after the data file is in place, before the model is renamed
    kill = ("real = io.publish\ncalls = []\ndef publish(tmp, out, **kw):\n    real(tmp, out, **kw)\n    calls.append(out)\n"
            "    if len(calls) == 1:\n        os._exit(9)\nio.publish = publish")
    r = driven(kill, ext, "--ratio", "0.5", "-o", out / "m.onnx")
    assert r.returncode == 9
    now = snapshot(out)
    assert {k: now[k] for k in old} == old                       # the old model and its data, unchanged
    assert "m.onnx.1.data" in now                                # the new data, under a name nothing reads
    got = run(onnx.load(str(out / "m.onnx")), feeds)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    # a failure (not a crash) at the same point takes the new data file back too
    fail = ("real = io.publish\ncalls = []\ndef publish(tmp, out, **kw):\n    calls.append(out)\n"
            "    if len(calls) == 2:\n        raise OSError(errno.EIO, 'I/O error')\n    real(tmp, out, **kw)\n"
            "io.publish = publish")
    shutil.rmtree(out)
    out.mkdir()
    assert cli(ext, "--ratio", "0.25", "-o", out / "m.onnx").returncode == 0
    old = snapshot(out)
    r = driven(fail, ext, "--ratio", "0.5", "-o", out / "m.onnx")
    one_line_error(r, 7, "m.onnx", "nothing written")
    assert snapshot(out) == old


def test_a_report_that_cannot_be_written_stops_the_model_too(work):
    (work / "r.json").mkdir()
    before = snapshot(work)
    one_line_error(cli(work / "bert.onnx", "--ratio", "0.5", "--report", work / "r.json"), 2, "directory")
    one_line_error(cli(work / "bert.onnx", "--ratio", "0.5", "--report", work / "no" / "r.json"), 2, "does not exist")
    assert snapshot(work) == before and not (work / "bert.pruned.onnx").exists()
    # the disk fills while the report is written: no model, no report, no temporary file
    full = ("real = io.StagedFile.__init__\ndef init(self, out, content):\n"
            "    raise io.write_error(out, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))\n"
            "io.StagedFile.__init__ = init")
    r = driven(full, work / "bert.onnx", "--ratio", "0.5", "--report", work / "r2.json")
    one_line_error(r, 7, "r2.json", "No space left")
    assert snapshot(work) == before and not (work / "bert.pruned.onnx").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
@pytest.mark.parametrize("external", [False, True])
def test_a_signal_while_writing_leaves_nothing(work, ext, sig, code, external):
    """The signal arrives while the model is being written into its staging folder (as `timeout`,
    `docker stop` or Ctrl-C would send it): the staging folder goes, nothing else is written."""
    model = ext if external else work / "bert.onnx"
    out = work / "out"
    out.mkdir()
    before, src = snapshot(work), snapshot(ext.parent)
    patch = (f"real = onnx.save\ndef save(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), {int(sig)})\n"
             "    import time; time.sleep(5)\nonnx.save = save")
    r = driven(patch, model, "--ratio", "0.5", "-o", out / "m.onnx")
    assert r.returncode == code, r.stderr
    assert "nothing written" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(work) == before and snapshot(ext.parent) == src
    assert list(out.iterdir()) == []


def test_a_kill_while_writing_leaves_nothing_under_a_final_name(ext, tmp_path):
    """SIGKILL (the OOM killer, ``kill -9``) cannot be caught: what the run leaves is what it had made. The data
    file's name is reserved by a hidden marker, not by an empty file under that name, so nothing that looks like
    an output is left (before, an empty ``m.onnx.data``); the next run takes the dead run's name over."""
    out = tmp_path / "out"
    out.mkdir()
    patch = "real = onnx.save\ndef save(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), 9)\nonnx.save = save"
    r = driven(patch, ext, "--ratio", "0.5", "-o", out / "m.onnx")
    assert r.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert left and all(name.startswith(".") for name in left), left     # a staging folder and the marker
    assert ".m.onnx.data.onnxprune-reserved" in left
    assert cli(ext, "--ratio", "0.5", "-o", out / "m.onnx").returncode == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["m.onnx", "m.onnx.data"]
    assert ".m.onnx.data.onnxprune-reserved" not in {p.name for p in out.iterdir()}
    onnx.checker.check_model(str(out / "m.onnx"), full_check=True)


def test_a_data_name_reserved_by_a_live_run_is_not_taken(ext, tmp_path):
    """A marker whose process is alive (this one) holds its name: the run takes the next."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".m.onnx.data.onnxprune-reserved").write_text(str(os.getpid()))
    assert cli(ext, "--ratio", "0.5", "-o", out / "m.onnx").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [".m.onnx.data.onnxprune-reserved", "m.onnx", "m.onnx.1.data"]


@pytest.mark.parametrize("external", [False, True])
def test_a_full_disk_is_one_line_and_leaves_nothing(work, ext, external):
    model = ext if external else work / "bert.onnx"
    out = work / "out"
    out.mkdir()
    full = ("def save(*a, **k):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\nonnx.save = save")
    r = driven(full, model, "--ratio", "0.5", "-o", out / "m.onnx")
    one_line_error(r, 7, "No space left on device", "nothing written")
    assert list(out.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 96 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_a_full_disk_is_one_line_and_leaves_nothing covers it")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("external", [False, True])
def test_a_really_full_disk(work, ext, tiny_disk, external):
    model = ext if external else work / "bert.onnx"     # about 120 KB and 300 KB pruned: neither fits
    r = cli(model, "--ratio", "0.25", "-o", tiny_disk / "m.onnx")
    one_line_error(r, 7, "No space left on device")
    assert list(tiny_disk.iterdir()) == []


def test_a_pruned_folder_copies_no_data_file_of_the_input(ext, tmp_path):
    """The input's data file under another name (model.onnx.1.data after a re-prune) is the model's, not
    one of the folder's other files: it is not copied into the pruned folder."""
    (ext.parent / "tokenizer.json").write_text("{}")
    first = tmp_path / "first"
    for _ in range(2):
        assert cli(ext, "--ratio", "0.25", "-o", f"{first}/").returncode == 0
    assert sorted(p.name for p in first.iterdir()) == ["model.onnx", "model.onnx.1.data", "tokenizer.json"]
    second = tmp_path / "second"
    r = cli(first / "model.onnx", "--ratio", "0.5", "-o", f"{second}/")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in second.iterdir()) == ["model.onnx", "model.onnx.data", "tokenizer.json"]


def test_ratio_zero_with_external_data_to_a_file(ext, tmp_path):
    before = snapshot(ext.parent)
    out = tmp_path / "r0.onnx"
    r = cli(ext, "--ratio", "0", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "max abs error 0.00e+00" in r.stdout
    assert snapshot(ext.parent) == before
    a, b = onnx.load(str(ext)), onnx.load(str(out))
    assert [(i.name, i.raw_data) for i in a.graph.initializer] == [(i.name, i.raw_data) for i in b.graph.initializer]


# ------------------------------------------------------------------ 4. one line, never a traceback
def _malformed(folder: Path, ext: Path) -> dict:
    """Model files that are not usable models, each as a path."""
    bad = {}
    bad["missing"] = folder / "nope.onnx"
    (folder / "empty.onnx").write_bytes(b"")
    bad["empty"] = folder / "empty.onnx"
    (folder / "trunc.onnx").write_bytes(BERT.read_bytes()[:5000])
    bad["truncated"] = folder / "trunc.onnx"
    (folder / "text.onnx").write_text("hello, I am not a model\n" * 20)
    bad["not_onnx"] = folder / "text.onnx"
    (folder / "dir.onnx").mkdir()
    bad["directory"] = folder / "dir.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(folder / "nograph.onnx"))
    bad["no_graph"] = folder / "nograph.onnx"
    for name, location in (("outside", "../secret.data"), ("absent", "gone.data")):
        m = onnx.load(str(ext), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(m, str(ext.parent / f"{name}.onnx"))
        bad[f"data_{name}"] = ext.parent / f"{name}.onnx"
    m = onnx.load(str(ext), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = str(int(e.value) + 10**7)
    onnx.save(m, str(ext.parent / "short.onnx"))
    bad["data_short"] = ext.parent / "short.onnx"
    return bad


def test_every_subcommand_refuses_malformed_models(work, ext, inproc):
    (ext.parent.parent / "secret.data").write_bytes(b"\0" * 4096)
    bad = _malformed(work, ext)
    for name, path in bad.items():
        for args in (["bench", path, BERT, "--runs", "1", "--no-memory"],
                     ["bench", BERT, path, "--runs", "1", "--no-memory"],
                     [path, "--ratio", "0.5", "-o", work / "o.onnx"], ["score", path, "-o", work / "s.onnx"],
                     ["inspect", path]):
            r = inproc(*args)
            assert r.returncode == 2, (name, args, r.stderr)
            one_line_error(r, 2)
    assert not (work / "o.onnx").exists() and not (work / "s.onnx").exists()


def test_bench_checks_its_inputs_and_finds_a_length_that_runs(work, inproc):
    common = ["--runs", "2", "--warmup", "0", "--no-memory"]
    r = inproc("bench", BERT, BERT, *common)                       # the README's example, at the default length
    assert r.returncode == 0, r.stderr
    assert "timed at seq 64" in r.stdout
    one_line_error(inproc("bench", BERT, BERT, "--seq", "128", *common), 2, "seq 128")   # asked for: refused
    ids = np.ones((2, 8), np.int64)
    for name, arrays in (("rank", dict(input_ids=ids[0], attention_mask=ids, token_type_ids=ids)),
                         ("words", dict(input_ids=np.array([["a"] * 8] * 2), attention_mask=ids, token_type_ids=ids)),
                         ("missing", dict(input_ids=ids)),
                         ("range", dict(input_ids=ids * 10**6, attention_mask=ids, token_type_ids=ids))):
        np.savez(work / f"{name}.npz", **arrays)
        r = inproc("bench", BERT, BERT, "--inputs", work / f"{name}.npz", *common)
        one_line_error(r, 2)
    one_line_error(inproc("bench", BERT, BERT, "--inputs", work, *common), 2)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "Infinity", "nan"])
def test_non_finite_ratios_are_one_line(work, value):
    one_line_error(cli(work / "bert.onnx", f"--ratio={value}"), 2, "ratio")
    assert not (work / "bert.pruned.onnx").exists()


def test_files_named_for_data_that_are_folders_or_words(work, inproc):
    (work / "dir.json").mkdir()
    (work / "words.json").write_text('{"0": ["high", "low", "low", "high"]}')
    (work / "nested.json").write_text('{"0": [[1, 2], [3, 4]]}')
    (work / "dup.json").write_text('{"0": [1, 2, 3, 4], "0": [4, 3, 2, 1]}')
    (work / "text.npy").write_text("not an array")
    (work / "empty.npy").write_bytes(b"")
    before = snapshot(work)
    for args in (["--heads-to-prune", work / "dir.json"], ["--ratio", "0.5", "--importance", work / "dir.json"],
                 ["--ratio", "0.5", "--importance", work / "words.json"],
                 ["--ratio", "0.5", "--importance", work / "nested.json"],
                 ["--ratio", "0.5", "--importance", work / "dup.json"], ["--heads-to-prune", work / "dup.json"],
                 ["--ratio", "0.5", "--calib", work / "dir.json"], ["--ratio", "0.5", "--importance", work / "text.npy"],
                 ["--ratio", "0.5", "--importance", work / "empty.npy"]):
        one_line_error(inproc(work / "bert.onnx", *args), 2)
        assert snapshot(work) == before, args


def test_outputs_that_are_not_regular_files_are_refused(work, inproc):
    """A FIFO (like /dev/null or /dev/stdout) would be replaced by the rename, device node and all."""
    os.mkfifo(work / "fifo")
    (work / "empty.npz").write_bytes(b"")
    before = {p.name for p in work.iterdir()}
    for args in (["-o", work / "fifo"], ["--report", work / "fifo"], ["-o", ""], ["--atol", "nan"],
                 ["--calib", work / "empty.npz"], ["--calib", BERT]):       # BERT: a pickle, to numpy
        r = inproc(work / "bert.onnx", "--ratio", "0.5", *args)
        one_line_error(r, 2)
        assert "allow_pickle" not in r.stderr                   # no advice to load pickles
    assert (work / "fifo").is_fifo() and {p.name for p in work.iterdir()} == before
    r = inproc("score", work / "bert.onnx", "-o", work / "s.onnx", "--json", work / "fifo")
    one_line_error(r, 2, "not a regular file")


def test_calibration_data_of_the_wrong_kind(work, inproc):
    model = onnx.load(str(BERT))
    good = synth_inputs(model, batch=4, seq=8)
    cases = {"words": dict(good, input_ids=np.array([["the"] * 8] * 4)),
             "rank": dict(good, input_ids=good["input_ids"].reshape(4, 2, 4)),
             "range": dict(good, input_ids=good["input_ids"] + 10**6),
             "fraction": dict(good, input_ids=good["input_ids"] + 0.5)}
    for name, data in cases.items():
        np.savez(work / f"{name}.npz", **data)
    before = snapshot(work)
    for name in cases:
        for args in ([work / "bert.onnx", "--ratio", "0.5", "--calib", work / f"{name}.npz"],
                     ["score", work / "bert.onnx", "--calib", work / f"{name}.npz", "-o", work / "s.onnx"]):
            r = inproc(*args)
            one_line_error(r, 2, "input_ids" if name != "range" else "out of data bounds")
            assert snapshot(work) == before, name


def test_a_reader_that_goes_away_does_not_change_what_is_written(work):
    """`onnxprune ... | head -1`: stdout closed before anything is printed. The model is written all the
    same, and there is no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune.cli", str(work / "bert.onnx"), "--ratio", "0.5",
                             "--report", str(work / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()                  # long before the first line: the interpreter is still starting
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert (work / "bert.pruned.onnx").exists() and json.loads((work / "r.json").read_text())["max_error"] == 0
    shell = subprocess.run(f"{sys.executable} -m onnxprune.cli {work / 'vit.onnx'} --ratio 0.5 | head -1",
                           shell=True, capture_output=True, text=True)
    assert shell.stdout.startswith("#") and "Traceback" not in shell.stderr
    assert (work / "vit.pruned.onnx").exists()


def test_the_api_takes_paths_and_bytes_and_names_what_it_refuses(ext):
    by_path = prune_model(str(BERT), 0.5)
    by_bytes = prune_model(BERT.read_bytes(), 0.5)
    by_proto = prune_model(onnx.load(str(BERT)), 0.5)
    assert by_path.kept == by_bytes.kept == by_proto.kept and by_path.max_error == 0.0
    assert prune_model(ext, 0.5).max_error == 0.0                       # a Path, external data read beside it
    assert len(inspect_model(BERT.read_bytes()).blocks) == 2
    assert len(score_model(BERT)[1]) == 2
    assert count_result_macs(BERT, by_path, 1, 16).macs[0].total > 0
    for bad in (None, 42, ["model.onnx"]):
        for call in (lambda m: prune_model(m, 0.5), inspect_model, score_model):
            with pytest.raises(ModelTypeError, match="onnx.ModelProto, a path"):
                call(bad)
        with pytest.raises(TypeError):                                   # ModelTypeError is a TypeError too
            prune_model(bad, 0.5)
    with pytest.raises(InputError, match="not an ONNX model"):
        prune_model(b"not a model at all", 0.5)
    with pytest.raises(InputError, match="no such file"):
        prune_model("missing.onnx", 0.5)
    with pytest.raises(TypeError, match="PruneResult"):
        count_result_macs(BERT, None)


# ------------------------------------------------------------------ 5. contradictions are refused
def test_contradictory_options_are_refused(work, inproc):
    before = snapshot(work)
    one_line_error(inproc(work / "bert.onnx", "--threshold", "nan"), 2, "--threshold")
    one_line_error(inproc(work / "bert.onnx", "--threshold", "inf"), 2, "--threshold")
    one_line_error(inproc(work / "bert.onnx", "--ratio", "0.5", "--multiple-of", "1000"), 4, "multiple of 1000")
    one_line_error(inproc(work / "bert.onnx", "--ratio", "0.5", "--multiple-of", "0"), 2, "--multiple-of")
    one_line_error(inproc(work / "bert.onnx", "--ratio", "0.5", "--seq", "0"), 2, "--seq")
    name = inspect_model(BERT).blocks[0].name
    (work / "twice.json").write_text(json.dumps({"0": [1, 2, 3, 4], name: [4, 3, 2, 1]}))
    one_line_error(inproc(work / "bert.onnx", "--ratio", "0.5", "--importance", work / "twice.json"), 2,
                   "named twice")
    assert snapshot(work) == {**before, "twice.json": (work / "twice.json").read_bytes()}
    (work / "same.json").write_text(json.dumps({"0": [1, 2, 3, 4], name: [1, 2, 3, 4]}))   # no contradiction
    r = inproc(work / "bert.onnx", "--ratio", "0.5", "--importance", work / "same.json", "--report", work / "r.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "r.json").read_text())["blocks"][0]["kept_heads"] == [2, 3]
    with pytest.raises(PlanError, match="finite"):
        prune_model(onnx.load(str(BERT)), threshold=float("nan"))


def test_fixed_input_shapes_drive_the_probe_and_the_calibration_batches(tmp_path, inproc):
    """A BERT export whose mask is fixed at [2, 7] while its ids stay dynamic, and a fully static one: the
    probe feeds every input at the fixed sizes, calibration cuts batches of the fixed batch size, and data
    that cannot be cut so is a one-line error."""
    for name in ("bert-fixed-mask-ts.onnx", "bert-static-ts.onnx"):
        model = onnx.load(str(MODELS / name))
        assert prune_model(model, 0.5).max_error == 0.0
        parts = [synth_inputs(model, seed=k) for k in range(4)]      # 4 batches of the fixed 2
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        np.savez(tmp_path / "c8.npz", **data)
        r = inproc(MODELS / name, "--ratio", "0.5", "--calib", tmp_path / "c8.npz", "--compensate", "--dry-run")
        assert r.returncode == 0 and "max abs error" in r.stdout, r.stderr
        assert "MACs at batch 2, seq 7" in r.stdout
        np.savez(tmp_path / "c7.npz", **{k: v[:7] for k, v in data.items()})
        one_line_error(inproc(MODELS / name, "--ratio", "0.5", "--calib", tmp_path / "c7.npz", "--compensate",
                              "--dry-run"), 2, "fixed at 2")


def test_calibration_data_drives_the_probe_where_synthetic_inputs_do_not_run():
    """A mask whose length is named so that synthetic inputs get it wrong ('batch_or_len'): the probe fails on
    them, and with calibration data it runs on the data's first samples instead."""
    model = onnx.load(str(BERT))
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_param = "batch_or_len"
    with pytest.raises(InputError, match="synthetic inputs"):
        prune_model(model, 0.5)
    data = synth_inputs(onnx.load(str(BERT)), batch=6, seq=9)
    result = prune_model(model, 0.5, importance="activation", calib=data)
    assert result.max_error == 0.0 and result.importance_source == "activation"


def test_a_model_with_external_data_is_verified_as_saved_on_the_inputs_its_probe_needed(tmp_path, inproc):
    """The CLI verifies an external-data model from the written file (``verify_saved``): on the calibration
    samples that drove the probe, not on synthetic inputs, which this model cannot run on."""
    model = onnx.load(str(BERT))
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_param = "batch_or_len"
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0,
              location="m.onnx.data")
    np.savez(tmp_path / "c.npz", **synth_inputs(onnx.load(str(BERT)), batch=6, seq=9))
    r = inproc(tmp_path / "m.onnx", "--ratio", "0.5", "--importance", "activation", "--calib", tmp_path / "c.npz",
               "-o", tmp_path / "out.onnx")
    assert r.returncode == 0, r.stderr
    assert "pruned == masked original: max abs error 0.00e+00" in r.stdout and (tmp_path / "out.onnx").exists()
