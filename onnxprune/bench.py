"""``onnxprune bench ORIGINAL PRUNED``: how much faster the pruned model runs, against what its MACs allow.

Both models run in one process on one provider, with ONNX Runtime's graph optimizations on (as deployed),
after a warm-up, interleaved run by run (ABBA order) so that drift in the machine's speed hits both alike.
The ideal speed-up is the ratio of their multiply-accumulate counts at the same batch and length
(``macs.py``); the report gives the measured speed-up, the ideal one and how much of the ideal gain was
realised: (measured - 1) / (ideal - 1). File sizes count the external data files. The memory of a session
is measured in a fresh process each: the growth of its resident memory from before the session is made to
after its first run (and, on CUDA where NVML answers, the GPU memory that process holds).

With ``decode`` steps, a model with a KV cache is also timed the way a decoder is served: one new token per
sequence against a cache filled to ``context`` tokens (random values: the time does not depend on them), the
same step repeated (the cache does not grow between the timed steps, so every step is priced at the same
context). Decode reads every weight once per step and each sequence's cache, and does little arithmetic per
byte, so its ideal speed-up is the ratio of the bytes read per token (``MacCount.bytes_per_token``), not of the
MACs. The memory then is the session's growth for one decode step at that context.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError
from .inputs import takes_past
from .runtime import PROVIDERS, providers_for


@dataclass(frozen=True)
class Side:
    path: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    file_bytes: int
    session_bytes: int | None       # peak host memory growth of a fresh process for the session
    gpu_bytes: int | None
    macs: int | None
    providers: tuple[str, ...]


@dataclass(frozen=True)
class DecodeSide:
    median_ms: float            # one decode step: ``batch`` new tokens against ``context`` cached ones
    p25_ms: float
    p75_ms: float
    kv_bytes: int               # the KV cache fed at ``context`` (every past input)
    bytes_per_token: int        # weights / batch + one sequence's cache: what a step reads per token made
    session_bytes: int | None   # resident memory growth for the session and one decode step


@dataclass(frozen=True)
class DecodeResult:
    context: int
    steps: int
    original: DecodeSide
    pruned: DecodeSide
    batch: int

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        return tuple(1e3 * self.batch / s.median_ms for s in (self.original, self.pruned))

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def ideal(self) -> float:
        return self.original.bytes_per_token / max(self.pruned.bytes_per_token, 1)

    @property
    def realised(self) -> float | None:
        return None if self.ideal <= 1 else (self.speedup - 1) / (self.ideal - 1)


@dataclass(frozen=True)
class GenaiDecode:
    """The same decode through onnxruntime-genai's own generator, as deployments serve a GenAI folder: its
    prompt of ``context`` tokens per sequence appended (prefill), then ``steps`` tokens timed, the two
    generators stepped in turn, two tokens a turn (the first not timed: ``genai_decode``)."""
    context: int
    steps: int
    prefill_s: tuple[float, float]           # original, pruned
    step_ms: tuple[float, float]             # median of the generated tokens' steps
    batch: int

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        return tuple(1e3 * self.batch / ms for ms in self.step_ms)


@dataclass(frozen=True)
class BenchResult:
    provider: str
    batch: int
    seq: int
    threads: int | None
    warmup: int
    runs: int
    original: Side
    pruned: Side
    macs_note: str | None = None
    note: str | None = None          # the length was shortened: why
    decode: DecodeResult | None = None
    genai: GenaiDecode | None = None

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def ideal(self) -> float | None:
        if not self.original.macs or not self.pruned.macs:
            return None
        return self.original.macs / self.pruned.macs

    @property
    def realised(self) -> float | None:
        """The share of the ideal gain that was measured: (speed-up - 1) / (ideal - 1)."""
        ideal = self.ideal
        if ideal is None or ideal <= 1:
            return None
        return (self.speedup - 1) / (ideal - 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(speedup=self.speedup, ideal_speedup=self.ideal, realised_gain=self.realised)
        if self.decode is not None:
            prompt = tuple(1e3 * self.batch * self.seq / s.median_ms for s in (self.original, self.pruned))
            d["prompt_tokens_per_s"] = {"original": prompt[0], "pruned": prompt[1]}
            d["decode"].update(tokens_per_s=dict(zip(("original", "pruned"), self.decode.tokens_per_s)),
                               speedup=self.decode.speedup, ideal_speedup=self.decode.ideal,
                               realised_gain=self.decode.realised)
        return d


def graph_of(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` without its external data: all that the inputs, MACs and sizes need."""
    return onnx.load(str(path), load_external_data=False)


def file_bytes(path: str | os.PathLike, model: onnx.ModelProto) -> int:
    """The size of the model file and of every external data file that ``model`` (loaded from it) names."""
    path = Path(path)
    files = {e.value for t in onnx.external_data_helper._get_all_tensors(model)
             for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).exists())


def session_options(threads: int | None, optimize: bool = True):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = threads
    # Two sessions in one process each keep a pool of threads that spin after every run, waiting for more
    # work, on the cores the other session then runs on: on 2 cores the session made second measured 3-10%
    # faster than an identical one made first (MiniLM, batch 4 x 256, 2026-12-07), which inflated every
    # speed-up. Without spinning, the two measure the same (1.000, 1.006).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 4         # failures are raised, and reported in one line, not logged
    return opts


def make_session(path, provider: str, threads: int | None):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), session_options(threads), providers=providers_for(provider))


class Runner:
    """Runs one session on fixed inputs; on a GPU the inputs and outputs stay on the device (IOBinding)."""

    def __init__(self, sess, feeds: dict[str, np.ndarray], device: bool):
        import onnxruntime as ort
        self.sess, self.feeds, self.binding = sess, feeds, None
        if device:
            self.binding = sess.io_binding()
            self._values = []
            for name, arr in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0)
                self._values.append(value)
                self.binding.bind_ortvalue_input(name, value)
            for out in sess.get_outputs():
                self.binding.bind_output(out.name, "cuda", 0)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        if self.binding is None:
            self.sess.run(None, self.feeds)
        else:
            self.binding.synchronize_inputs()
            self.sess.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        return (time.perf_counter() - t0) * 1e3


def inputs_for(model: onnx.ModelProto, batch: int, seq: int,
               data: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Synthetic inputs at ``batch`` x ``seq``, or the arrays of ``data`` checked against the declared
    inputs: every one present, numeric, of the declared rank and fixed sizes."""
    from .inputs import checked_array, synth_inputs
    inits = {t.name for t in model.graph.initializer}
    declared = [i for i in model.graph.input if i.name not in inits]
    if data is None:
        return synth_inputs(model, batch=batch, seq=seq, past=0)
    missing = [i.name for i in declared if i.name not in data]
    if missing:
        raise InputError(f"--inputs has no array for graph input(s) {', '.join(missing)}")
    feeds = {inp.name: checked_array(data[inp.name], inp, "--inputs") for inp in declared}
    return feeds


def macs_of(path, model: onnx.ModelProto, batch: int, seq: int) -> int:
    from .macs import count_macs
    return count_macs(model, [], batch, seq, external_dir=Path(path).parent).total


def _child_memory(path: str, provider: str, threads, feeds, queue):
    """In a fresh process: the resident memory growth of making the session and running it once."""
    try:
        import onnxruntime  # noqa: F401  (its import is not the session's memory)
        before = _rss()
        sess = make_session(path, provider, threads)
        Runner(sess, feeds, provider != "cpu")()
        queue.put((_rss() - before, _gpu_bytes()))
    except Exception:             # reported as unknown, never fatal
        queue.put((None, None))


def _rss() -> int:
    """The resident memory of this process now, on every platform (psutil: /proc on Linux, the task's working
    set on Windows, mach on macOS; the standard library has no portable call for it)."""
    import psutil
    return int(psutil.Process().memory_info().rss)


def _gpu_bytes() -> int | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory)
    except Exception:
        return None
    return None


def session_memory(path, provider: str, threads, feeds) -> tuple[int | None, int | None]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_memory, args=(str(path), provider, threads, feeds, queue))
    proc.start()
    try:
        got = queue.get(timeout=600)
    except Exception:
        got = (None, None)
    proc.join()
    return got[0], got[1]


LENGTHS = (128, 64, 32, 16, 8)      # tried in turn when no length is given


def decode_inputs(model: onnx.ModelProto, batch: int, context: int) -> dict[str, np.ndarray]:
    """One new token per sequence, a KV cache of ``context`` tokens (random values), every mask all ones."""
    from .inputs import synth_inputs
    feeds = synth_inputs(model, batch=batch, seq=1, past=context)
    return {k: (np.ones_like(v) if "mask" in k.lower() else v) for k, v in feeds.items()}


def timed(runners, warmup: int, runs: int, progress=None) -> list[list[float]]:
    """``runs`` times of each runner after ``warmup``, interleaved ABBA."""
    for _ in range(warmup):
        for r in runners:
            r()
    times: list[list[float]] = [[] for _ in runners]
    for i in range(runs):
        order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))
        for k in order:
            times[k].append(runners[k]())
        if progress is not None:
            progress.update(1)
    return times


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p25, p75)"""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def _decode(paths, sessions, graphs, provider, threads, batch, context, steps, warmup, memory,
            progress) -> DecodeResult:
    from .macs import stored_bytes
    from .runtime import ort_reason
    feeds = [decode_inputs(g, batch, context) for g in graphs]
    for p, s, f in zip(paths, sessions, feeds):
        try:
            s.run(None, f)
        except Exception as exc:         # a context beyond the model's position or rotary table
            raise InputError(f"{p}: onnxruntime could not run a decode step at batch {batch} with {context} "
                             f"tokens cached (--context): {ort_reason(exc)}") from None
    times = timed([Runner(s, f, provider != "cpu") for s, f in zip(sessions, feeds)], warmup, steps, progress)
    sides = []
    for p, g, f, t in zip(paths, graphs, feeds, times):
        kv = sum(v.nbytes for k, v in f.items() if "past" in k.lower())
        mem = session_memory(p, provider, threads, f)[0] if memory else None
        sides.append(DecodeSide(*quartiles(t), kv, (stored_bytes(g) + kv) // batch, mem))
    return DecodeResult(context, steps, sides[0], sides[1], batch)


def genai_folder(path) -> Path | None:
    """The GenAI folder that holds model ``path``, or None."""
    folder = Path(path).parent
    return folder if (folder / "genai_config.json").is_file() else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the platform says, else every core)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def genai_decode(folders, batch: int, context: int, steps: int, warmup: int = 2, progress=None,
                 threads: int | None = None) -> GenaiDecode:
    """Prefill and decode through onnxruntime-genai's generator for two GenAI folders (see ``GenaiDecode``):
    random prompt tokens, greedy search held from stopping early (``min_length``). Each generator runs on
    ``threads`` intra-op threads, by default the cores this process may use, as ONNX Runtime's sessions do: left
    to its config, onnxruntime-genai 0.18 ran one (the 1B int4 decoder's step took 78 ms on 1 of 2 cores, 41 ms
    on both)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise InputError("--genai needs onnxruntime-genai (pip install onnxruntime-genai)") from None
    rng = np.random.default_rng(0)
    gens, prefill = [], []
    total = context + 2 * (warmup + steps)
    for folder in folders:
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads or usable_cores()}}}}))
            model = og.Model(config)
            vocab = int(json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"])
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=total, min_length=total, batch_size=batch, do_sample=False)
            gen = og.Generator(model, params)
            prompt = rng.integers(3, vocab, (batch, context)).astype(np.int32)
            t0 = time.perf_counter()
            gen.append_tokens(prompt)
        except Exception as exc:         # onnxruntime-genai's own errors: a context beyond its config
            raise InputError(f"{folder}: onnxruntime-genai could not take a prompt of {context} tokens at batch "
                             f"{batch}: {str(exc).splitlines()[0][:240]}") from None
        prefill.append(time.perf_counter() - t0)
        gens.append((model, gen))

    def step(k):
        # the first token after the other generator's runs finds that generator's threads still spinning (its
        # config has no switch for that, as our sessions have): it is generated, not timed; the next one is timed
        gens[k][1].generate_next_token()
        t0 = time.perf_counter()
        gens[k][1].generate_next_token()
        return (time.perf_counter() - t0) * 1e3
    times = timed([lambda k=k: step(k) for k in range(len(gens))], warmup, steps, progress)
    return GenaiDecode(context, steps, tuple(prefill), tuple(statistics.median(t) for t in times), batch)


def bench(original, pruned, provider: str = "cpu", batch: int = 1, seq: int | None = None,
          threads: int | None = None, warmup: int = 5, runs: int = 50, inputs: dict[str, np.ndarray] | None = None,
          memory: bool = True, progress=None, graphs=None, decode: int = 0, context: int = 4096,
          genai: bool = False) -> BenchResult:
    """Time ``original`` and ``pruned`` (paths) on ``provider``, interleaved; see the module docstring.

    Without ``seq``, the length is 128, or the longest of 64, 32, 16, 8 at which both models run (a short
    position table), and the result's note says so. ``graphs``: the two models already loaded without
    their external data (else they are loaded and checked here). ``decode``: that many decode steps more,
    each model's KV cache filled to ``context`` tokens; with ``genai`` (GenAI folders), the same through
    onnxruntime-genai's generator too (``genai_decode``). Errors are one-line ``InputError``s."""
    from .model.load import load_model
    from .runtime import ort_reason
    if runs < 1 or warmup < 0 or batch < 1 or (seq is not None and seq < 1) or decode < 0 or context < 1:
        raise InputError("--runs, --batch, --seq and --context must be at least 1, --warmup and --decode at least 0")
    paths = [Path(original), Path(pruned)]
    graphs = graphs or [load_model(p, external_data=False) for p in paths]
    if decode:
        missing = [str(p) for p, g in zip(paths, graphs) if not takes_past(g)]
        if missing:
            raise InputError(f"--decode needs models that take a KV cache (past inputs), and {' and '.join(missing)} "
                             f"take{'s' if len(missing) == 1 else ''} none: bench the form with past (an Optimum "
                             "decoder_with_past or *-past export, a GenAI folder)")
    if genai:
        folders = [genai_folder(p) for p in paths]
        if not decode or None in folders:
            raise InputError("--genai times onnxruntime-genai's generator: it needs --decode N and two GenAI "
                             "folders (with genai_config.json)")
    sessions = []
    for p in paths:
        try:
            sessions.append(make_session(p, provider, threads))
        except InputError:
            raise
        except Exception as exc:        # onnxruntime's own types: bad external data, unknown ops
            raise InputError(f"{p}: onnxruntime cannot load it: {ort_reason(exc)}") from None
    lengths = [seq] if seq is not None or inputs is not None else list(LENGTHS)
    note, first = None, None
    for length in lengths:
        feeds = [inputs_for(g, batch, length or 0, inputs) for g in graphs]
        try:
            for p, s, f in zip(paths, sessions, feeds):
                failing = p
                s.run(None, f)
            break
        except Exception as exc:         # e.g. a length beyond the model's position table
            first = first or ort_reason(exc)
            if length == lengths[-1]:
                at = "on --inputs" if inputs is not None else f"at batch {batch}, seq {length}"
                raise InputError(f"{failing}: onnxruntime could not run it {at}: {first}") from None
    if length != lengths[0]:
        note = f"the models do not run at seq {lengths[0]} ({first}); timed at seq {length}"
    seq = length if length is not None else 128       # --inputs: MACs at the default size, as before
    try:
        macs = [macs_of(p, g, batch, seq) for p, g in zip(paths, graphs)]
        macs_note = None
    except Exception as exc:
        macs, macs_note = [None, None], f"MACs not counted at batch {batch}, seq {seq}: {str(exc)[:200]}"
    times = timed([Runner(s, f, provider != "cpu") for s, f in zip(sessions, feeds)], warmup, runs, progress)
    providers = [tuple(s.get_providers()) for s in sessions]
    decoded = _decode(paths, sessions, graphs, provider, threads, batch, context, decode, warmup, memory,
                      progress) if decode else None
    del sessions
    generated = genai_decode(folders, batch, context, decode, min(warmup, 2), progress, threads) if genai else None
    mem = [session_memory(p, provider, threads, f) if memory else (None, None) for p, f in zip(paths, feeds)]
    sides = []
    for k, p in enumerate(paths):
        median, p25, p75 = quartiles(times[k])
        sides.append(Side(str(p), median, p25, p75, min(times[k]),
                          file_bytes(p, graphs[k]), mem[k][0], mem[k][1], macs[k], providers[k]))
    return BenchResult(provider, batch, seq, threads, warmup, runs, sides[0], sides[1], macs_note, note, decoded,
                       generated)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def format_bench(r: BenchResult) -> str:
    o, p = r.original, r.pruned
    used = o.providers[0] if o.providers else r.provider
    lines = [f"provider {used}, batch {r.batch}, seq {r.seq}, threads {r.threads or 'default'}, "
             f"{r.runs} runs each after {r.warmup} warm-up, interleaved",
             f"{'':<22}{'original':>14}{'pruned':>14}",
             f"{'median':<22}{o.median_ms:>11.3f} ms{p.median_ms:>11.3f} ms",
             f"{'p25 - p75':<22}{f'{o.p25_ms:.3f}-{o.p75_ms:.3f}':>14}{f'{p.p25_ms:.3f}-{p.p75_ms:.3f}':>14}",
             f"{'min':<22}{o.min_ms:>11.3f} ms{p.min_ms:>11.3f} ms",
             f"{'MACs':<22}{_g(o.macs):>14}{_g(p.macs):>14}",
             f"{'file':<22}{_mb(o.file_bytes):>14}{_mb(p.file_bytes):>14}",
             f"{'session memory':<22}{_mb(o.session_bytes):>14}{_mb(p.session_bytes):>14}"]
    if o.gpu_bytes is not None or p.gpu_bytes is not None:
        lines.append(f"{'GPU memory':<22}{_mb(o.gpu_bytes):>14}{_mb(p.gpu_bytes):>14}")
    lines.append(_speedup_line("speed-up", r.speedup, r.ideal, "MACs", r.realised))
    if r.decode is not None:
        d, (t0, t1) = r.decode, r.decode.tokens_per_s
        lines += [f"prompt ({r.batch} x {r.seq} tokens, the cache empty): "
                  f"{1e3 * r.batch * r.seq / o.median_ms:,.0f} -> {1e3 * r.batch * r.seq / p.median_ms:,.0f} tokens/s",
                  f"decode, {d.context:,} tokens cached per sequence, {d.steps} steps each, interleaved:",
                  f"{'step median':<22}{d.original.median_ms:>11.3f} ms{d.pruned.median_ms:>11.3f} ms",
                  f"{'p25 - p75':<22}{f'{d.original.p25_ms:.3f}-{d.original.p75_ms:.3f}':>14}"
                  f"{f'{d.pruned.p25_ms:.3f}-{d.pruned.p75_ms:.3f}':>14}",
                  f"{'tokens/s':<22}{t0:>14,.1f}{t1:>14,.1f}",
                  f"{'KV cache':<22}{_mb(d.original.kv_bytes):>14}{_mb(d.pruned.kv_bytes):>14}",
                  f"{'bytes read per token':<22}{_mb(d.original.bytes_per_token):>14}{_mb(d.pruned.bytes_per_token):>14}",
                  f"{'session memory':<22}{_mb(d.original.session_bytes):>14}{_mb(d.pruned.session_bytes):>14}"]
        lines.append(_speedup_line("decode speed-up", d.speedup, d.ideal, "bytes read per token: the weights "
                                   "once per batch and the cache", d.realised))
    if r.genai is not None:
        g, (t0, t1) = r.genai, r.genai.tokens_per_s
        lines += [f"onnxruntime-genai's generator, a prompt of {g.context:,} tokens per sequence, then {g.steps} "
                  "tokens each, in turn:",
                  f"{'prefill':<22}{g.prefill_s[0]:>12.3f} s{g.prefill_s[1]:>12.3f} s",
                  f"{'decode tokens/s':<22}{t0:>14,.1f}{t1:>14,.1f}",
                  f"generator decode speed-up: measured {t1 / t0:.3f}x"]
    if r.macs_note:
        lines.append(r.macs_note)
    if r.note:
        lines.append(f"note: {r.note}")
    if o.providers and o.providers[0] != PROVIDERS[r.provider][0]:
        lines.append(f"note: ONNX Runtime ran {o.providers[0]}, not {PROVIDERS[r.provider][0]}")
    return "\n".join(lines)


def _speedup_line(what: str, measured: float, ideal: float | None, by: str, realised: float | None) -> str:
    line = f"{what}: measured {measured:.3f}x"
    if ideal is not None:
        line += f", ideal {ideal:.3f}x ({by}), measured/ideal {measured / ideal:.3f}"
        if realised is not None:
            line += f", {100 * realised:.0f}% of the ideal gain"
    return line


def _g(n: int | None) -> str:
    from .macs import human
    return human(n, " ")
