"""Calibration data from text: ``onnxprune calib MODEL TEXT... -o DATA.npz``, made with the model's tokenizer
for every graph input, and a calibrated prune that runs on it; data that does not fit is named at once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import MODELS, cli

GENAI = MODELS / "llama-genai"


def words(n: int, seed: int) -> str:
    """Text in the test GenAI folder's word-level vocabulary, lines of twelve words (not t10...t29: its special
    tokens t1 and t2 would split them)."""
    import json
    vocab = sorted(w for w, i in json.loads((GENAI / "tokenizer.json").read_text())["model"]["vocab"].items()
                   if i >= 3 and w.startswith("t") and w[:2] not in ("t1", "t2"))
    rng = np.random.default_rng(seed)
    picked = [vocab[i] for i in rng.integers(0, len(vocab), size=n)]
    return "\n".join(" ".join(picked[j:j + 12]) for j in range(0, n, 12))


@pytest.fixture
def folder(tmp_path):
    dst = tmp_path / "genai"
    shutil.copytree(GENAI, dst)
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text(words(700, 0))
    (texts / "sub" / "b.md").write_text(words(500, 1))
    (texts / ".hidden.txt").write_text("not read")
    return dst, texts


def test_calib_from_a_folder_of_text_fits_a_genai_folder_and_the_calibrated_prune_runs_on_it(folder, tmp_path):
    dst, texts = folder
    r = cli("calib", dst / "model.onnx", texts, "-o", tmp_path / "c.npz", "--seq", "32", "--samples", "16")
    assert r.returncode == 0, r.stderr
    assert "from 2 file(s)" in r.stdout
    with np.load(tmp_path / "c.npz") as z:
        data = {k: z[k] for k in z.files}
    from tokenizers import Tokenizer
    ids = []
    for f in (texts / "a.txt", texts / "sub" / "b.md"):
        ids += Tokenizer.from_file(str(dst / "tokenizer.json")).encode(f.read_text()).ids
    assert data["input_ids"].shape == (16, 32) and (data["input_ids"].reshape(-1) == ids[:16 * 32]).all()
    assert (data["attention_mask"] == 1).all() and data["attention_mask"].shape == (16, 32)
    past = [k for k in data if k.startswith("past_key_values")]
    assert len(past) == 4 and all(data[k].shape[0] == 16 and data[k].shape[2] == 0 for k in past)
    p = cli(dst / "model.onnx", "--ratio", "0.5", "--calib", tmp_path / "c.npz", "--compensate", "-o",
            tmp_path / "out" / "")
    assert p.returncode == 0, p.stderr
    assert "compensation chosen per block" in p.stdout


def test_a_tokenizer_that_truncates_and_pads_for_inference_still_reads_whole_files(folder, tmp_path):
    """sentence-transformers' tokenizer.json cuts every text at 128 tokens: a file is one text here, so that
    would leave one window per file (8 windows of 64 from the MiniLM folder's 30k tokens of text)."""
    import json
    dst, texts = folder
    cfg = json.loads((dst / "tokenizer.json").read_text())
    cfg["truncation"] = {"direction": "Right", "max_length": 40, "strategy": "LongestFirst", "stride": 0}
    cfg["padding"] = {"strategy": {"Fixed": 48}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "<pad>"}
    (dst / "tokenizer.json").write_text(json.dumps(cfg))
    r = cli("calib", dst / "model.onnx", texts, "-o", tmp_path / "c.npz", "--seq", "32", "--samples", "64")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "c.npz") as z:
        assert z["input_ids"].shape[0] >= 30          # 1,200 words: not 2 truncated files of 40 tokens


def test_calib_data_without_the_empty_cache_arrays_is_completed(folder, tmp_path):
    """A KV-cache model's past inputs, empty, need not be in DATA.npz: they are made."""
    dst, texts = folder
    ids = np.random.default_rng(0).integers(3, 96, size=(8, 16))
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    r = cli(dst / "model.onnx", "--ratio", "0.5", "--calib", tmp_path / "d.npz", "--compensate", "--dry-run")
    assert r.returncode == 0, r.stderr


def test_data_that_does_not_fit_is_named_all_at_once(tmp_path):
    np.savez(tmp_path / "c.npz", input_ids=np.ones((2, 3), dtype=np.int64), pixels=np.ones((2, 3)))
    r = cli(MODELS / "bert-ts.onnx", "--ratio", "0.5", "--calib", tmp_path / "c.npz", "--dry-run")
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1
    assert "no array for graph input(s) 'attention_mask'" in err and "'pixels' not graph inputs" in err
    assert "onnxprune calib" in err


@pytest.mark.parametrize("make,words_", [
    (lambda d, t: ["calib", d / "model.onnx", t / "none", "-o", t / "c.npz"], "no such file or folder"),
    (lambda d, t: ["calib", MODELS / "bert-ts.onnx", t / "texts", "-o", t / "c.npz"], "no tokenizer.json beside"),
    (lambda d, t: ["calib", d / "model.onnx", t / "texts", "-o", t / "c.npz", "--seq", "4096"],
     "fewer than one window of --seq 4096"),
    (lambda d, t: ["calib", d / "model.onnx", t / "prose.txt", "-o", t / "c.npz"], "the tokenizer cannot encode"),
    (lambda d, t: ["calib", d / "model.onnx", t / "texts", "-o", t / "c.txt"], "is an .npz file"),
])
def test_calib_refusals_are_one_line_and_write_nothing(folder, tmp_path, make, words_):
    dst, _ = folder
    (tmp_path / "prose.txt").write_text("Words that this toy vocabulary does not hold.")
    r = cli(*make(dst, tmp_path))
    assert r.returncode == 2 and words_ in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "c.txt").exists()


def test_text_cannot_give_pixels(tmp_path):
    """A vision model's pixel input: named, with the way to give it."""
    vit = next(p for p in sorted(MODELS.glob("vit*.onnx")))
    shutil.copy(vit, tmp_path / "m.onnx")
    shutil.copy(GENAI / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "t.txt").write_text(words(300, 2))
    r = cli("calib", tmp_path / "m.onnx", tmp_path / "t.txt", "-o", tmp_path / "c.npz", "--seq", "16")
    assert r.returncode == 2 and "text cannot give the graph input(s) pixel" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--compensate"], ["--importance", "activation"], ["--compensate", "bias"]])
def test_calibrated_work_without_data_is_refused_unless_synthetic_is_asked_for(args, tmp_path):
    """No --calib: calibrated scores and --compensate would fit random token ids; refused with how to make
    the data, unless --synthetic-calib says that is meant. Weights-only scores need no data."""
    r = cli(MODELS / "bert-ts.onnx", "--ratio", "0.5", *args, "-o", tmp_path / "p.onnx")
    assert r.returncode == 2 and "needs calibration data" in r.stderr and "onnxprune calib" in r.stderr
    assert not (tmp_path / "p.onnx").exists()
    ok = cli(MODELS / "bert-ts.onnx", "--ratio", "0.5", *args, "--synthetic-calib", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert cli(MODELS / "bert-ts.onnx", "--ratio", "0.5", "--dry-run").returncode == 0
    s = cli("score", MODELS / "bert-ts.onnx", "--importance", "ablation", "-o", tmp_path / "s.onnx")
    assert s.returncode == 2 and "needs calibration data" in s.stderr
