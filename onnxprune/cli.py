"""Command line: ``onnxprune MODEL --ratio R`` and ``onnxprune inspect MODEL``."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from .errors import InputError, MatchError, OnnxPruneError

PRUNE_HELP = """\
Remove attention heads from a transformer exported to ONNX, and prove the result exact.

Every attention block is found (see `onnxprune inspect MODEL`), each keeps floor(H * (1 - ratio))
heads (at least --min-heads), chosen by importance, and the model is rewritten: Q/K/V/O weights and
biases, packed QKV, Split sizes, Reshape/Expand shapes, per-head bias tables, attributes. The pruned
model is then run against the original with the dropped heads masked out (their output-projection rows
zeroed) on ONNX Runtime CPU; nothing is written unless the outputs match.

Plain torch.onnx exports (TorchScript and dynamo, with the ONNX Attention op too), ONNX Runtime's fused
com.microsoft Attention / MultiHeadAttention / GroupQueryAttention and ORT GenAI builder folders are
matched. Models with external data (above 2 GB) keep their weights on disk: only attention weights are
read, and the output gets a fresh data file. fp16 stays fp16. Quantized models stay quantized: QDQ,
int8 dynamic (MatMulInteger) and int4 MatMulNBits (GenAI -p int4) weights are cut with their scales and
zero points, never re-quantized; QOperator models (QLinearMatMul) are refused: prune, then quantize.

examples:
  onnxprune models/bert-ts.onnx --ratio 0.5
  onnxprune model.onnx --ratio 0.25 -o small.onnx --report small.json
  onnxprune model.onnx --heads-to-prune heads.json      # {"0": [1, 3], "5": [0]}: heads to remove
  onnxprune model.onnx --ratio 0.5 --dry-run            # show the plan, write nothing
  onnxprune genai/model.onnx --ratio 0.5 -o small/      # a GenAI folder: KV groups go, the KV cache and
                                                        # genai_config.json shrink, tokenizer copied
  onnxprune inspect model.onnx                          # blocks found, and why others were not
  onnxprune bench model.onnx model.pruned.onnx --batch 4 --seq 256   # measured vs ideal speed-up

importance (which heads go), --importance:
{importance}
Calibration runs on --calib DATA.npz (one array per graph input, samples along axis 0), or on synthetic
inputs where --synthetic-calib asks for them. Make it from text with the model's tokenizer (see `onnxprune help calib`):
  onnxprune calib model.onnx texts/ -o data.npz
Score once, prune to many ratios:
  onnxprune score model.onnx --calib data.npz -o scored.onnx
  onnxprune scored.onnx --ratio 0.5 --compensate --calib data.npz
--compensate recovers what the dropped heads gave, block by block, on the calibration data: auto (the
default) tries no change, the dropped heads' mean added to the bias (bias; FLAP), one scale per kept head
(scale) and a refit of the output projection (refit) on three quarters of the data, and keeps for each block
what reconstructs the held-out quarter best (the report gives that error). --scope global ranks
all heads of all blocks together; --threshold T keeps the heads scoring at least T (learned gates).

Cutting inside the heads keeps every head and makes each smaller, a better use of the same MACs:
  onnxprune model.onnx --qk-dims 0.5 --calib data.npz            # queries and keys keep D/2 dimensions
  onnxprune model.onnx --v-dims 0.25 --calib data.npz            # V (and its cache) and W_o keep 3D/4
  onnxprune model.onnx --attention-ratio 0.5 --calib data.npz    # half the attention MACs, spent per block
Each head's circuit is kept at rank r by a rotation fitted to the calibration data (to the weights alone
without --calib); the proof is then against the original with those maps written into its weights. Through
a rotary embedding (Llama, Mistral, Qwen2, Phi, GPT-J, GenAI folders) QK keeps whole pairs of positions
instead, chosen by their share of the scores, and the cos/sin tables are cut to match; through RMS q/k
norms (Gemma 3, Qwen3) the pairs are kept in W_q, W_k and the norms' weights, each norm's mean rescaled, so
the projections shrink too (a norm that cannot be passed: the pairs are kept after it, and only the scores
and the K cache shrink). --v-dims shrinks the V cache (Gemma 3's one KV head too). GroupQueryAttention has one head
size: give --qk-dims and --v-dims alike; its ranks are rounded up to multiples of 16 (ONNX Runtime's kernel).
A quantized model keeps its integers: QK whole pairs, V whole positions in runs of 16. --compensate
refits the cut output projections; the budget does.

Nothing is written unless pruned == masked holds; no output ever replaces a file of the input (the model,
its external data) or another output; a model and its data file appear together or not at all. --force
only lets the pruned model replace the input model.

everywhere: -q (no progress bars or tables: only what was written, and errors), -v (every unmatched node),
--version, `onnxprune help [COMMAND]`, `python -m onnxprune` where the script is not on PATH.

exit codes: 0 ok, 2 bad input, 3 no attention matched, 4 plan impossible, 5 rewrite failed, 6 verification
failed (NaN included), 7 an output could not be written (a full disk), 1 another system error; 130 Ctrl-C,
143 SIGTERM, 129 SIGHUP. Errors are one line on stderr, and leave no file behind.
"""


def _ratio(text: str):
    from .plan import exact_ratio
    try:
        exact_ratio(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    value = _threshold(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


class UsageError(InputError):
    """A bad option or argument: argparse's message, raised rather than exiting, so that a caller other than
    the command line (the Olive pass) gets it as an error; ``main`` prints it after the command's name."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(self.prog, message)


def _prune_parser() -> argparse.ArgumentParser:
    from .options import COMPENSATE_MODES, DECODE_CONTEXT, GQA_MODES, SCOPES, PruneOptions      # choices and defaults: options.py's
    from .importance import help_lines
    text = PRUNE_HELP.replace("{importance}", help_lines())
    first, rest = text.split("\n\n", 1)        # the options come first, the teaching after them
    p = _Parser(prog="onnxprune", description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter,
                usage="onnxprune MODEL (--ratio R | --threshold T | --heads-to-prune FILE) [--qk-dims R] [--v-dims R] "
                      "[options]\n"
                      "       onnxprune score MODEL [--importance METHOD] [--calib DATA.npz] -o SCORED.onnx\n"
                      "       onnxprune inspect MODEL [--json] [--calib DATA.npz]\n"
                      "       onnxprune calib MODEL TEXT... -o DATA.npz [--tokenizer PATH] [--seq S]\n"
                      "       onnxprune bench ORIGINAL PRUNED [--provider cpu|cuda|tensorrt] [--batch B] [--seq S]")
    p.add_argument("model", type=Path, help="the .onnx file to prune, or a model folder (GenAI, Optimum: its "
                   "model, written as a pruned folder DIR-pruned/ unless -o says otherwise)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=_ratio, help="fraction of heads to remove in every block, in [0, 1]")
    how.add_argument("--threshold", type=_threshold, metavar="T",
                     help="keep the heads whose importance is at least T (stored gate values, for instance)")
    how.add_argument("--heads-to-prune", type=Path, metavar="FILE",
                     help='JSON {"<block index>": [head, ...]} of heads to remove, blocks numbered as inspect lists')
    p.add_argument("-o", "--output", help="output path (default: <stem>.pruned.onnx beside MODEL); DIR/ writes a "
                                          "pruned model folder: the model, updated config files, tokenizer...")
    p.add_argument("--report", type=Path, metavar="REPORT.json", help="write the per-block report as JSON (-: on "
                   "stdout, the summary then on stderr)")
    p.add_argument("--min-heads", type=_at_least(0), default=PruneOptions.min_heads, metavar="N",
                   help=f"keep at least N heads per block ({PruneOptions.min_heads})")
    p.add_argument("--dry-run", action="store_true", help="match, plan and verify, but write no file")
    p.add_argument("--force", action="store_true", help="allow the pruned model to replace the input model")
    p.add_argument("--no-verify", action="store_true", help="skip the pruning-equals-masking check")
    p.add_argument("--strict", action="store_true",
                   help="refuse a model in which some attention-like node is not matched (exit 3), instead of "
                        "pruning the blocks that are and reporting the others")
    p.add_argument("--gqa", choices=GQA_MODES, default=PruneOptions.gqa,
                   help="grouped-query attention: remove whole KV groups (group; the default when the model "
                        "has a KV cache, which then shrinks) or the same query heads from every group (uniform)")
    _importance_options(p)
    p.add_argument("--scope", choices=SCOPES, default=PruneOptions.scope,
                   help="layer: the same fraction in every block (default); global: rank all heads together")
    p.add_argument("--compensate", nargs="?", const=COMPENSATE_MODES[0], choices=COMPENSATE_MODES,
                   default=PruneOptions.compensate,
                   help="recover the dropped heads' contribution on the calibration data: auto (the default) "
                        "picks per block, on a quarter of the data held out, among none, bias, scale and refit; "
                        "bias adds their mean to the output bias; scale fits one factor per kept head; refit "
                        "refits the kept rows of the output projection (the cut rows after --qk-dims/--v-dims); --attention-ratio "
                        "compensates (auto) unless given --compensate none")
    p.add_argument("--multiple-of", type=_at_least(1), default=None, metavar="N",
                   help="round each block's kept heads up (adding its next best) so that kept heads x head size "
                        "is a multiple of N, for hardware that wants aligned widths; with --qk-dims/--v-dims, "
                        "each kept rank is rounded up to a multiple of N")
    dims = p.add_argument_group("cutting inside the heads (every head stays, each gets smaller)")
    dims.add_argument("--qk-dims", type=_ratio, metavar="R",
                      help="remove the fraction R of each head's QK rank: queries and keys keep floor(D x (1 - R)) "
                           "dimensions, a rotation that keeps the scores best on --calib (from the weights alone "
                           "without it); through a rotary embedding, whole pairs of positions (through RMS q/k "
                           "norms too)")
    dims.add_argument("--v-dims", type=_ratio, metavar="R",
                      help="remove the fraction R of each head's OV rank: V (and its cache) and the output "
                           "projection's rows keep floor(D x (1 - R)), fitted the same way")
    dims.add_argument("--attention-ratio", type=_ratio, metavar="R",
                      help="remove the fraction R of the attention MACs, spent where it costs least: each block's "
                           "QK and OV ranks lowered step by step (D/8, or --multiple-of), or a head dropped, where "
                           "the loss measured on held-out --calib batches grows least per MAC saved; then "
                           "compensated (auto; --compensate none: not; never on a quantized model). Written as a "
                           "GenAI folder (-o DIR/), every layer gets the same cut, as its config holds one head "
                           "count and one head size. Needs --calib")
    dims.add_argument("--target-speedup", type=float, metavar="X",
                      help="reach a measured speed-up of X instead of a share of MACs: a few variants of the model "
                           "(half its heads, half of each head's QK or OV rank...) are timed on --provider at "
                           "--batch x --seq first, the time each saves fitted to what it stops computing "
                           "(projections, scores, softmax, KV cache), and the budget's steps priced by predicted "
                           "time saved until X is predicted; the pruned model is then timed against the original "
                           "and the report gives both. Needs --calib")
    dims.add_argument("--target-decode", action="store_true",
                      help="with --target-speedup: the speed-up of a decode step (tokens/s) at --batch against "
                           "--context cached tokens, for a model with a KV cache")
    dims.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                      help="the ONNX Runtime provider that calibration and the proof run on, and --target-speedup "
                           "times on (cpu; cuda and tensorrt need onnxruntime-gpu: calibration and the proof then "
                           "run on cuda, with TF32 off for the proof)")
    p.add_argument("--seq", type=_at_least(1), default=None,
                   help="sequence length for the MAC count in the report (128, or less if the model's "
                        "position table is shorter)")
    p.add_argument("--batch", type=_at_least(1), default=1, help="batch size for the MAC count in the report (1)")
    p.add_argument("--context", type=_at_least(1), default=DECODE_CONTEXT, metavar="C",
                   help=f"cached tokens per sequence at which the report prices a decode step of a model with a KV "
                        f"cache: the weights read once per batch plus the cache ({DECODE_CONTEXT})")
    p.add_argument("--atol", type=_tolerance, default=None,
                   help="verification tolerance (default 1e-4; 1e-2 for fp16 models)")
    p.add_argument("--proof", choices=("auto", "whole", "segments", "blocks"), default="auto",
                   help="how the pruned model is proved equal to the original (masked): both run whole; in segments "
                        "of at most 256 MiB of weights each, one after the other (the same outputs, in the memory of "
                        "one segment); or block by block, each attention block cut out of both and run alone on the "
                        "same random inputs, everything outside the blocks compared with the original's (it reads "
                        "the attention weights only; quantized models and cuts inside the heads fall back to "
                        "segments). auto: whole where the models fit in memory, else block by block. Calibration "
                        "runs the model in segments where it would not fit")
    return p


def _importance_options(p):
    from .importance import NAMED
    p.add_argument("--importance", metavar="SOURCE",
                   help=f"{', '.join(NAMED)}, or a .json/.npy file (see above)")
    p.add_argument("--calib", type=Path, metavar="DATA.npz",
                   help="calibration data: one array per graph input, samples along axis 0")
    p.add_argument("--importance-initializer", metavar="NAME_OR_GLOB",
                   help="the initializers that hold stored scores (default: *.head_importance)")
    p.add_argument("--synthetic-calib", action="store_true",
                   help="let calibrated scores and --compensate run on synthetic inputs (random token ids) when "
                        "no --calib is given: a smoke test, not a fit of real data")


def _score_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune score", description="Score every head of MODEL and store the scores in a copy "
                "of it, as <block name>.head_importance initializers. `onnxprune SCORED --ratio R` then uses "
                "them, with no data needed.")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the scored model")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input")
    p.add_argument("--json", type=Path, metavar="SCORES.json", help="also write the scores as JSON")
    _importance_options(p)
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune inspect", description="List the graph inputs of MODEL (what --calib data holds), "
                "its attention blocks, and for every Softmax or Attention node that was not matched, the node and "
                "the reason.")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--calib", type=Path, metavar="DATA.npz",
                   help="run the model on the first samples of DATA (one array per graph input, as for the "
                        "prune) instead of synthetic inputs: for a model that only real inputs run")
    return p


CALIB_HELP = """\
Make calibration data (DATA.npz, for --calib) from real text that fits MODEL's inputs.

TEXT is text files or folders of them. The text is tokenized with the model's own tokenizer (tokenizer.json
beside MODEL, as GenAI and Optimum folders hold it; else --tokenizer), cut into --samples windows of --seq
tokens, and every graph input is made as the graph wants it: token ids, all-ones attention masks, position
ids, zero token types, a KV cache's past inputs empty. Use text like what the model will see in
deployment, and judge the pruned model on other text.

examples:
  onnxprune calib genai/model.onnx docs/ -o calib.npz
  onnxprune calib model.onnx corpus.txt --tokenizer hf-folder/ --seq 256 --samples 128 -o calib.npz
  onnxprune genai/model.onnx --attention-ratio 0.25 --calib calib.npz -o small/
"""


def _calib_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune calib", description=CALIB_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("text", type=Path, nargs="+", help="text files, or folders of them")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DATA.npz")
    p.add_argument("--tokenizer", type=Path, metavar="PATH", help="tokenizer.json, or the folder that holds it "
                   "(default: beside MODEL)")
    p.add_argument("--seq", type=_at_least(2), default=128, help="tokens per window (128)")
    p.add_argument("--samples", type=_at_least(1), default=64, metavar="N", help="windows at most (64)")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite a file")
    return p


def run_calib(argv) -> int:
    import io
    import numpy as np
    from .calibration.text import embedding_rows, find_tokenizer, text_calibration, text_files, tokenize
    from .files import StagedFile, check_output_path, check_writes
    from .model.external import input_files
    from .model.load import load_model
    args = _calib_parser().parse_args(argv)
    args.model = _model_path(args.model)
    if args.output.suffix != ".npz":
        raise InputError(f"-o {args.output}: calibration data is an .npz file")
    check_output_path(args.model, args.output, args.force)
    model = load_model(args.model, external_data=False)
    files = text_files(args.text)
    check_writes(input_files(args.model, model) + [f.resolve() for f in files], {"output": args.output})
    tokenizer = find_tokenizer(args.model, args.tokenizer)
    ids = tokenize(tokenizer, files)
    data = text_calibration(model, ids, args.seq, args.samples, embedding_rows(model))
    buf = io.BytesIO()
    np.savez(buf, **data)
    staged = StagedFile(args.output, buf.getvalue())
    n = len(next(iter(data.values())))
    staged.publish()
    say(f"wrote {args.output}: {n} windows of {args.seq} tokens from {len(files)} file(s), {len(ids):,} tokens "
        f"({tokenizer}); inputs " + ", ".join(f"{k} {list(v.shape)}" for k, v in data.items()))
    return 0


BENCH_HELP = """\
Time ORIGINAL against PRUNED on one ONNX Runtime provider and compare the speed-up with the ideal one.

Both models run in this process, with ONNX Runtime's graph optimizations on, after --warmup runs each,
then --runs runs each, interleaved (ABBA), so that the machine's drift hits both alike. The ideal speed-up
is MACs before / MACs after at the same batch and length; the share of the ideal gain that was realised is
(measured - 1) / (ideal - 1). File sizes include external data; the memory of each session is measured in
a fresh process (resident memory growth for making the session and running it once).

Inputs are synthetic (token ids, all-ones masks, random floats) at --batch x --seq, a KV cache's past empty;
--inputs DATA.npz (one array per graph input) overrides them.

A decoder is served one token at a time: with --decode N, a model with a KV cache (a GenAI folder, an
Optimum decoder with past) is also timed over N decode steps each, one new token per sequence against a cache
filled to --context tokens, and the report gives prompt and decode tokens/s, the KV cache's bytes and the
memory of a decode step. A decode step reads every weight once and each sequence's cache, so its ideal
speed-up is the ratio of the bytes read per token (weights / batch + one sequence's cache), not of the MACs:
removing query heads but no KV groups saves little there, removing KV groups or K/V dimensions saves the cache.

examples:
  onnxprune bench model.onnx model.pruned.onnx --batch 4 --seq 256
  onnxprune bench model.onnx model.pruned.onnx --provider cuda --runs 200 --json bench.json
  onnxprune bench genai/ pruned/ --batch 4 --seq 128 --decode 20 --context 4096
"""


def _bench_parser() -> argparse.ArgumentParser:
    from .options import DECODE_CONTEXT
    p = _Parser(prog="onnxprune bench", description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original", type=Path, help="an .onnx file, or a model folder (GenAI, Optimum)")
    p.add_argument("pruned", type=Path)
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="ONNX Runtime execution provider (cuda and tensorrt need onnxruntime-gpu)")
    p.add_argument("--batch", type=_at_least(1), default=1, help="batch size (1)")
    p.add_argument("--seq", type=_at_least(1), default=None,
                   help="sequence length (128, or the longest power of two below it at which both models run)")
    p.add_argument("--threads", type=_at_least(1), default=None, metavar="N", help="intra-op threads (ORT's default)")
    p.add_argument("--warmup", type=_at_least(0), default=5, metavar="W", help="warm-up runs per model (5)")
    p.add_argument("--runs", type=_at_least(1), default=50, metavar="R", help="timed runs per model (50)")
    p.add_argument("--inputs", type=Path, metavar="DATA.npz", help="real inputs instead of synthetic ones")
    p.add_argument("--decode", type=_at_least(1), default=0, metavar="N",
                   help="also time N decode steps per model against a filled KV cache (models with past inputs)")
    p.add_argument("--context", type=_at_least(1), default=DECODE_CONTEXT, metavar="C",
                   help=f"tokens cached per sequence for --decode ({DECODE_CONTEXT})")
    p.add_argument("--genai", action="store_true",
                   help="with --decode on GenAI folders: also prefill --context tokens and generate through "
                        "onnxruntime-genai's own generator, the client deployments run")
    p.add_argument("--no-memory", action="store_true", help="skip the session memory measurement")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the figures as JSON")
    return p


def run_bench(argv) -> int:
    from .bench import bench, format_bench
    from .progress import Progress
    from .files import StagedFile, check_output_path, check_writes
    from .model.external import input_files
    from .model.load import load_model
    from .report import json_bytes
    args = _bench_parser().parse_args(argv)
    args.original, args.pruned = _model_path(args.original), _model_path(args.pruned)
    if args.json:
        check_output_path(args.original, args.json, True)
    graphs = [load_model(path, external_data=False) for path in (args.original, args.pruned)]
    inputs = input_files(args.original, graphs[0]) + input_files(args.pruned, graphs[1])
    check_writes(inputs, {"--json file": args.json})
    data = None
    if args.inputs:
        try:
            with np_load(args.inputs) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as exc:
            from .calibration.data import npz_reason
            raise InputError(f"{args.inputs}: not a readable .npz file ({npz_reason(exc)})") from None
    with Progress(args.runs + args.decode * (2 if args.genai else 1), "timing", min_total=1, unit="runs") as progress:
        result = bench(args.original, args.pruned, args.provider, args.batch, args.seq, args.threads,
                       args.warmup, args.runs, data, memory=not args.no_memory, progress=progress, graphs=graphs,
                       decode=args.decode, context=args.context, genai=args.genai)
    staged = StagedFile(args.json, json_bytes(result.as_dict())) if args.json else None
    say(format_bench(result), detail=True)
    if staged is not None:
        staged.publish()
        say(f"wrote {args.json}")
    return 0


def np_load(path):
    import numpy as np
    return np.load(path, allow_pickle=False)


def run_inspect(argv) -> int:
    from .api import inspect_model
    from .inputs import first_samples
    from .model.external import has_external_data
    from .model.load import load_model
    from .report import format_inspect, graph_inputs, inspect_json
    args = _inspect_parser().parse_args(argv)
    args.model = _model_path(args.model)
    model = load_model(args.model, external_data=False)      # external weights stay on disk, unread
    feeds = first_samples(model, _calib(args, model)) if args.calib else None
    result = inspect_model(model, args.model.parent if has_external_data(model) else None, feeds)
    inputs = graph_inputs(model)
    say(json.dumps(inspect_json(result, inputs), indent=2) if args.json else format_inspect(result, inputs))
    return 0 if result.blocks else 3


def _model_path(path: Path) -> Path:
    """MODEL as given, or the model of a model folder (``config.model_in_folder``)."""
    if path.is_dir():
        from .config import model_in_folder
        return model_in_folder(path)
    return path


def _calib(args, model):
    from .calibration.data import load_calib
    return load_calib(args.calib, model) if args.calib else None


def _needs_data(args, model_path):
    """Calibrated scores or --compensate without --calib: refused unless --synthetic-calib (random token ids
    fit nothing real, and the summary would speak of calibration data)."""
    from .importance import CALIBRATED
    if args.calib is not None or args.synthetic_calib:
        return
    wants = [f"--importance {args.importance}"] if args.importance in CALIBRATED else []
    if getattr(args, "compensate", None):
        wants.append("--compensate")
    if wants:
        raise InputError(f"{' and '.join(wants)} {'needs' if len(wants) == 1 else 'need'} calibration data: make it from text with `onnxprune calib "
                         f"{model_path} TEXT... -o data.npz` and give --calib data.npz (or --synthetic-calib for "
                         "random inputs)")


def run_score(argv) -> int:
    from .api import score_model
    from .importance import default_calibrated
    from .model import inline
    from .files import StagedFile, check_output_path, check_writes
    from .model.external import has_external_data, input_files
    from .model.load import load_model
    from .model.save import stage_model
    from .report import json_bytes
    args = _score_parser().parse_args(argv)
    args.model = _model_path(args.model)
    _needs_data(args, args.model)
    check_output_path(args.model, args.output, args.force)
    if args.json:
        check_output_path(args.model, args.json, True)
    model = load_model(args.model, external_data=False)
    inputs = input_files(args.model, model)
    check_writes(inputs, {"output": args.output, "--json file": args.json},
                 may_replace=args.model if args.force else None)
    external = has_external_data(model)
    where = args.model.parent if external else None
    calib = _calib(args, model)
    method = args.importance or (default_calibrated(None) if calib is not None else "weights")
    scored, blocks, scores = score_model(model, method, calib=calib, external_dir=where)
    staged = stage_model(scored, args.output, external=external, external_dir=where,
                         avoid=[args.json] if args.json else [], keep=inputs,
                         inline_from=args.model if inline.self_contained(model, args.model) else None)
    table = None
    try:
        if args.json:
            table = StagedFile(args.json, json_bytes({"method": method, "blocks": {
                b.name: [float(v) for v in scores[b.index]] for b in blocks}}))
        for b in blocks:
            say(f"{b.index:>2}  {b.name:<40} " + " ".join(f"{v:.3g}" for v in scores[b.index]), detail=True)
        staged.publish()
        if table is not None:
            table.publish()
    except BaseException:
        if table is not None:
            table.discard()
        raise
    finally:
        staged.discard()
    say(f"wrote {args.output} ({method} scores for {len(blocks)} blocks)")
    if args.json:
        say(f"wrote {args.json}")
    return 0


def _confirm_speed(original: Path, pruned: Path, target, runs: int = 30):
    """The measured speed-up of ``pruned`` (as staged) over ``original`` at the speed target's batch and length,
    timed as ``bench`` does; (None, why) where it cannot be timed."""
    from .bench import bench
    decode = bool(target.context)      # then the forward pass is not what is asked: timed once, not ``runs`` times
    try:
        r = bench(original, pruned, target.provider, target.batch, target.seq, runs=1 if decode else runs,
                  warmup=2 if decode else 5, memory=False, decode=runs if decode else 0, context=target.context or 1)
    except OnnxPruneError as exc:
        return None, str(exc)
    return (r.decode.speedup if decode else r.speedup), None


def run_prune(argv) -> int:
    parser = _prune_parser()
    args = parser.parse_args(argv)
    if args.ratio is None and args.threshold is None and args.heads_to_prune is None \
            and args.qk_dims is None and args.v_dims is None and args.attention_ratio is None \
            and args.target_speedup is None:
        parser.error("one of the arguments --ratio --threshold --heads-to-prune --qk-dims --v-dims "
                     "--attention-ratio --target-speedup is required")
    if args.target_decode and args.target_speedup is None:
        parser.error("--target-decode qualifies --target-speedup X; give both")
    from .model import inline
    from .api import count_result_macs, prune_model, verify_saved
    from .options import PruneOptions, SpeedTarget
    from .config import GENAI, configs_beside, plan_folder, stage_folder
    from .files import StagedFile, check_output_path, check_writes
    from .model.external import has_external_data, input_files
    from .model.load import load_model
    from .model.save import stage_model
    from .report import build_report, format_table, json_bytes
    from .plan import load_heads_to_prune
    import onnx
    global TO_STDERR
    to_stdout = args.report is not None and str(args.report) == "-"     # --report -: the JSON on stdout,
    if to_stdout:                                                          # the rest on stderr
        args.report, TO_STDERR = None, True
    if args.output is not None and not args.output.strip():
        raise InputError("-o: the output path is empty")
    if args.model.is_dir() and args.output is None:     # a model folder (GenAI, Optimum): a pruned folder
        folder_in = args.model.resolve()
        args.output = str(folder_in.with_name(f"{folder_in.name}-pruned")) + os.sep
    args.model = _model_path(args.model)
    _needs_data(args, args.model)
    folder_mode = bool(args.output) and (args.output.endswith(("/", os.sep)) or Path(args.output).is_dir())
    out = Path(args.output) if args.output else args.model.with_name(f"{args.model.stem}.pruned.onnx")
    if folder_mode:
        out = out / args.model.name          # a folder: the pruned model folder (configs, tokenizer...)
    # every path this run writes is checked before any work: folders, and no input file overwritten
    if not args.dry_run:                     # a folder that does not exist yet is made in an existing one
        missing = folder_mode and not out.parent.exists()
        check_output_path(args.model, out.parent if missing else out, args.force)
    if args.report:
        check_output_path(args.model, args.report, True)
    model = load_model(args.model, external_data=False)
    inputs = input_files(args.model, model)
    check_writes(inputs, {"output": None if args.dry_run else out, "report": args.report},
                 may_replace=args.model if args.force else None)
    external = has_external_data(model)          # then weights stay on disk; only attention is read
    self_contained = inline.self_contained(model, args.model)   # a large file read as a skeleton of itself
    where = args.model.parent if external else None
    # a large model is verified as written (in a temporary folder), not from memory
    verify_saved_copy = external and not args.dry_run and not args.no_verify
    options = PruneOptions(
        ratio=args.ratio, threshold=args.threshold, min_heads=args.min_heads,
        heads_to_prune=load_heads_to_prune(args.heads_to_prune) if args.heads_to_prune else None,
        scope=args.scope, importance=args.importance, importance_initializer=args.importance_initializer,
        calib=_calib(args, model), compensate=args.compensate, gqa=args.gqa, multiple_of=args.multiple_of,
        verify=not args.no_verify and not verify_saved_copy, atol=args.atol, proof=args.proof, external_dir=where,
        provider="cpu" if args.provider == "cpu" else "cuda",
        qk_dims=args.qk_dims, v_dims=args.v_dims, attention_ratio=args.attention_ratio,
        uniform_blocks=folder_mode and any(p.name == GENAI for p in configs_beside(args.model)),
        target=None if args.target_speedup is None else
        SpeedTarget(args.target_speedup, args.provider, args.batch, args.seq or 128,
                    args.context if args.target_decode else None))
    result = prune_model(model, options=options)
    missed = [m for m in result.misses if m.op]
    if args.strict and missed:
        raise MatchError(f"--strict: {len(missed)} attention-like node(s) not matched, first {missed[0].describe()}")
    result = count_result_macs(model, result, args.batch, args.seq or 128, where, shrink=args.seq is None)
    folder = plan_folder(args.model, out, result, inputs[1:]) if folder_mode and not args.dry_run else []
    if args.report and any(dst.resolve() == args.report.resolve() for dst, _ in folder):
        raise InputError(f"{args.report}: the report would overwrite a file of the pruned folder; name another")
    pruned = result.model
    if pruned is model:       # an unchanged model: staging points a model's tensors at its new data file,
        pruned = onnx.ModelProto()                   # and the input's own object must keep its references
        pruned.CopyFrom(model)
    made_dir = folder_mode and not args.dry_run and not out.parent.exists()
    if made_dir:
        out.parent.mkdir()
    staged, extra = None, []            # the model, then the report and the folder's other files
    try:
        if not args.dry_run:
            staged = stage_model(pruned, out, external=external, external_dir=where,
                                 avoid=[d for d, _ in folder] + ([args.report] if args.report else []), keep=inputs,
                                 inline_from=args.model if self_contained else None)
        if verify_saved_copy:
            result = verify_saved(model, result, staged.path, where, atol=args.atol)
        measured = _confirm_speed(args.model, staged.path, options.target) if staged and options.target else None
        report = build_report(result, str(args.model), None if args.dry_run else str(out), args.ratio, args.context,
                              measured)
        if staged is not None:       # the bytes on disk, before and after (external data included)
            written = [staged.path] + ([staged.dir / staged.data] if staged.data else [])
            report["file_bytes"] = [sum(f.stat().st_size for f in inputs), sum(f.stat().st_size for f in written)]
            report["external_data"] = bool(staged.data)
        extra = stage_folder(folder)       # staged with the model: all are written, or none
        if args.report:
            extra.append(StagedFile(args.report, json_bytes(report)))
        say(format_table(report, every_miss=VERBOSE), detail=True)
        # every byte is written by now (a full disk has stopped the run, leaving nothing); only renames follow
        if staged is not None:
            staged.publish()
        for f in extra:
            f.publish()
    except BaseException:
        if staged is not None:
            staged.discard()
        for f in extra:
            f.discard()
        if made_dir and not any(out.parent.iterdir()):
            out.parent.rmdir()              # nothing of ours is left behind
        raise
    if staged is not None:
        say(f"wrote {out}" + (f" and {len(folder)} more files in {out.parent}" if folder else ""))
        if not folder and configs_beside(args.model) and out.parent.resolve() == args.model.parent.resolve():
            say(f"note: {', '.join(p.name for p in configs_beside(args.model))} still describe the "
                "original; write to another folder (-o DIR/) for a runnable pruned folder")
    if args.report:
        say(f"wrote {args.report}")
    if to_stdout:
        TO_STDERR = False
        say(json_bytes(report).decode().rstrip())
    return 0


QUIET = VERBOSE = False     # -q: no progress bars or tables, only what was written; -v: every detail
TO_STDERR = False           # stdout holds something else (--report -)


def say(text: str, detail: bool = False):
    """Print to stdout; a reader that went away (``| head -1``) does not stop the run or what it writes.
    ``detail``: a table or summary, left out with ``-q``."""
    if detail and QUIET:
        return
    if TO_STDERR:
        _error(text)
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP (``timeout``, ``docker stop``, systemd, a closed terminal): unwound like Ctrl-C, so
    that every staged file is removed on the way out."""


def _terminate(signum, frame):
    raise Terminated(signum)


def _catch_signals() -> dict:
    previous = {}       # SIGHUP does not exist on Windows
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except (ValueError, OSError):       # not the main thread: leave the handlers alone
            pass
    return previous


COMMANDS = {"prune": run_prune, "score": run_score, "inspect": run_inspect, "bench": run_bench,
            "calib": run_calib}


def version() -> str:
    """``onnxprune X (onnx Y, onnxruntime Z)``: what a bug report needs, read from the installed metadata
    (importing onnxruntime would take a second)."""
    from importlib import metadata
    from . import __version__
    found = []
    for name in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"onnxprune {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


def _dispatch(argv) -> int:
    from .progress import Progress
    global QUIET, VERBOSE
    QUIET, VERBOSE = any(a in ("-q", "--quiet") for a in argv), any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-q", "--quiet", "-v", "--verbose")]
    Progress.enabled = not QUIET
    if not argv:           # a bare command: what it does and how to ask for more, not an argparse error
        _error(_prune_parser().format_usage().rstrip() + "\n\nprune the attention heads of an ONNX "
               "transformer; `onnxprune --help` explains every option")
        return 2
    if argv[0] in ("--version", "-V"):
        say(version())
        return 0
    if argv[0] == "help":         # `onnxprune help [COMMAND]`
        if len(argv) > 1 and argv[1] not in COMMANDS:
            raise InputError(f"help: no command {argv[1]!r}; the commands are {', '.join(COMMANDS)}")
        return _dispatch([argv[1], "--help"] if len(argv) > 1 and argv[1] != "prune" else ["--help"])
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_prune(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = _catch_signals()
    try:
        return _dispatch(argv)
    except UsageError as exc:
        _error(f"{exc.prog}: error: {exc}")
        return exc.exit_code
    except OnnxPruneError as exc:
        _error(f"onnxprune: error: {exc}")
        return exc.exit_code
    except SystemExit as exc:         # argparse: --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt:
        _error("onnxprune: interrupted; nothing written")
        return 130
    except Terminated as exc:
        _error("onnxprune: terminated; nothing written")
        return 128 + exc.args[0]
    except MemoryError:
        _error("onnxprune: error: out of memory (a smaller --batch, --seq or calibration set needs less); "
               "nothing written")
        return 1
    except OSError as exc:            # what no check could foresee: a disk that fills, a folder that goes
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _error(f"onnxprune: error: {where}{exc.strerror or exc}; nothing written")
        return 1
    finally:
        global QUIET, VERBOSE, TO_STDERR
        from .progress import Progress
        QUIET = VERBOSE = TO_STDERR = False          # main() called again in one process starts afresh
        Progress.enabled = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            _silence_stdout()


def _error(text: str):
    try:
        print(text, file=sys.stderr)
    except (BrokenPipeError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
