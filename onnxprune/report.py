"""The per-block report: a terminal table and a JSON document with a stable layout (see README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .api import PruneResult
from .block import MatchResult
from .files import StagedFile
from .macs import human as _count
from .options import DECODE_CONTEXT
from .budget import FEATURES


def build_report(result: PruneResult, model: str, output: str | None, ratio, context: int = DECODE_CONTEXT,
                 measured: tuple | None = None) -> dict:
    """The report of ``result`` (see the README's "Report format"); ``measured``: (the speed-up measured after a
    speed target, or None, and why not) from timing the written model."""
    blocks = []
    for b in result.blocks:
        kept = list(result.kept[b.index])
        fits = {f.circuit: f for f in result.dim_fits if f.block == b.index}
        ranks = {c: (fits[c].rank if c in fits else b.head_dim) for c in ("qk", "ov")}
        blocks.append({
            "name": b.name, "family": b.family, "num_heads": b.num_heads, "num_kv_heads": b.num_kv_heads,
            "head_dim": b.head_dim, "kept_heads": kept, "kept_kv_heads": b.kept_kv_heads(kept),
            "o_proj": {"initializer": b.o_proj.weight, "head_axis": b.o_proj.head_axis},
            "min_heads_applied": bool(result.min_heads_applied.get(b.index, False)),
            "importance": [float(v) for v in result.importance[b.index]] if b.index in result.importance else None,
            "qk_rank": ranks["qk"], "ov_rank": ranks["ov"],
            "held_out_error": {c: f.error for c, f in fits.items()},
            "kept_positions": {c: list(f.positions) for c, f in fits.items() if f.positions is not None},
            "qk_below_norms": b.qk_below("q") and "qk" in fits,
            "qk_through_norms": {"q": bool(b.norm_means), "k": bool(b.norm_means) and not b.qk_below("k")}
            if b.norm_means and "qk" in fits else None,
            "macs": None if result.macs is None else {"before": result.macs[0].blocks.get(b.index),
                                                      "after": result.macs[1].blocks.get(b.index)},
        })
    from .pipeline import is_fp16, relative_proof
    width = 2 if is_fp16(result.model) else 4
    # K and V of every kept KV head per token: K keeps the QK rank, V the OV rank
    kv_bytes = {"before": sum(2 * b["num_kv_heads"] * b["head_dim"] * width for b in blocks),
                "after": sum(len(b["kept_kv_heads"]) * (b["qk_rank"] + b["ov_rank"]) * width for b in blocks)}
    macs = None
    if result.macs is not None:
        before, after = result.macs
        macs = {"batch": before.batch, "seq": before.seq, "before": before.total, "after": after.total,
                "ideal_speedup": before.ideal_speedup(after),
                "weight_bytes": {"before": before.weight_bytes, "after": after.weight_bytes}}
    decode = None
    if result.macs is not None and result.kv_cache:
        # a decode step reads the weights once for the batch and each sequence's whole cache
        decode = {"batch": result.macs[0].batch, "context": context,
                  **{k: m.bytes_per_token(kv_bytes[k], result.macs[0].batch, context)
                     for k, m in zip(("before", "after"), result.macs)}}
    opts = result.options
    speed = None
    if opts is not None and opts.target is not None:
        t, lat = opts.target, opts.latency
        speed = {"target": t.speedup, "provider": t.provider, "batch": t.batch, "seq": t.seq, "context": t.context,
                 "predicted": None if result.budget is None else result.budget.predicted,
                 "measured": None if measured is None else measured[0],
                 "measured_note": "not timed: nothing written (--dry-run)" if measured is None else measured[1],
                 "base_ms": None if lat is None else lat.base_ms,
                 "costs": None if lat is None else dict(zip(FEATURES, lat.coef)),
                 "variants": [] if lat is None else [{"name": n, "measured_ms": m, "predicted_ms": p}
                                                     for n, m, p in lat.points]}
    return {"model": str(model), "output": str(output) if output else None,
            "ratio": None if ratio is None else float(ratio),
            "threshold": None if opts is None or opts.threshold is None else float(opts.threshold),
            "scope": None if opts is None else opts.scope, "min_heads": None if opts is None else opts.min_heads,
            "params_before": result.params_before, "params_after": result.params_after,
            "max_error": result.max_error,
            "max_error_relative": relative_proof(result.model, result.plans),
            "proof": None if result.max_error is None else
            {"run": result.proof_run or ("segments" if result.proof_segment_bytes else "whole"),
             "segment_bytes": result.proof_segment_bytes, "note": result.proof_note},
            "gqa": result.gqa, "kv_cache": result.kv_cache,
            "importance": result.importance_source, "compensate": result.compensate,
            "quantized": result.quantized,
            "compensation": [{"block": f.block, "mode": f.mode, "held_out_error_before": f.error_before,
                              "held_out_error_after": f.error_after} for f in result.fits],
            "gates_folded": result.gates, "multiple_of": result.multiple_of, "macs": macs,
            "macs_note": result.macs_note, "kv_cache_bytes_per_token": kv_bytes, "decode_bytes_per_token": decode,
            "qk_dims": None if opts is None or opts.qk_dims is None else float(opts.qk_dims),
            "v_dims": None if opts is None or opts.v_dims is None else float(opts.v_dims),
            "attention_ratio": None if opts is None or opts.attention_ratio is None else float(opts.attention_ratio),
            "speed_target": speed,
            "dims_source": result.dims_source, "blocks": blocks,
            "budget": None if result.budget is None else {
                "chosen": result.budget.chosen, "held_out_loss": result.budget.loss,
                "whole_heads_loss": result.budget.heads_loss, "compensated": result.budget.compensated,
                "uniform": result.budget.uniform},
            "misses": [{"node": m.node, "op": m.op, "reason": m.reason} for m in result.misses if m.op]}


def format_table(report: dict, every_miss: bool = False) -> str:
    dims = report.get("dims_source") is not None
    rows = [("#", "block", "family", "H", "kept", "kept heads")
            + (("D", "QK", "OV", "held-out error") if dims else ())]
    for i, b in enumerate(report["blocks"]):
        note = " (min-heads)" if b.get("min_heads_applied") else ""
        row = (str(i), _tail(b["name"], 48), b["family"], str(b["num_heads"]), str(len(b["kept_heads"])) + note,
               ",".join(map(str, b["kept_heads"])))
        if dims:
            err = b.get("held_out_error") or {}
            row += (str(b["head_dim"]), str(b["qk_rank"]), str(b["ov_rank"]),
                    " ".join(f"{c} {e:.3f}" for c, e in sorted(err.items())))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    before, after = report["params_before"], report["params_after"]
    change = 100 * (before - after) / max(before, 1)
    lines.append(f"parameters: {before:,} -> {after:,} ({change:.1f}% fewer)" if after <= before else
                 f"parameters: {before:,} -> {after:,} ({-change:.1f}% more)")
    if report.get("file_bytes"):
        was, now = report["file_bytes"]
        lines.append(f"file size: {_size(was)} -> {_size(now)}" + (" (with external data)" if report.get(
            "external_data") else ""))
    if any(b["num_kv_heads"] not in (1, b["num_heads"]) for b in report["blocks"]):
        dropped = any(len(b["kept_kv_heads"]) < b["num_kv_heads"] for b in report["blocks"])
        how = ("same query heads per KV group" if report.get("gqa") != "group" else
               "whole KV groups removed" if dropped else "whole KV groups; none removed")
        lines.append(f"grouped-query attention: --gqa {report.get('gqa')} ({how})")
        ratio = report.get("ratio")
        if report.get("gqa") == "group" and ratio is not None:     # whole groups: the ratio is rounded to them
            for b in report["blocks"]:
                if b["num_kv_heads"] in (1, b["num_heads"]):
                    continue
                removed = 1 - len(b["kept_heads"]) / b["num_heads"]
                if abs(removed - float(ratio)) > 1e-9:
                    lines.append(f"  --ratio {float(ratio):g} removed {removed:.0%} of the query heads: --gqa group "
                                 f"keeps floor({b['num_kv_heads']} KV groups x (1 - {float(ratio):g})) = "
                                 f"{len(b['kept_kv_heads'])} whole group(s) of {b['num_heads'] // b['num_kv_heads']} "
                                 "heads (--gqa uniform removes query heads inside every group)")
                    break
    if any(b["num_kv_heads"] == 1 < b["num_heads"] for b in report["blocks"]):
        v_cut = any(b.get("ov_rank", b["head_dim"]) < b["head_dim"] for b in report["blocks"])
        k_cut = any(b.get("qk_rank", b["head_dim"]) < b["head_dim"] for b in report["blocks"])
        shrink = " and ".join(x for x, cut in (("K by its QK pairs", k_cut), ("V by its OV rank", v_cut)) if cut)
        lines.append("multi-query attention: one KV head serves every query head, so query heads go one by one "
                     + (f"and the cache shrinks only inside the head: {shrink}" if shrink else
                        "and K, V and their cache keep their size")
                     + (" (--gqa group does not apply)" if report.get("gqa") == "group" else ""))
    if report.get("quantized"):
        lines.append(f"quantized weights ({report['quantized']}): cut in their quantized form, with their scales "
                     "and zero points; nothing re-quantized")
    kv = report.get("kv_cache_bytes_per_token")
    if kv and (report.get("kv_cache") or (dims and kv["before"] != kv["after"])
               or any(b["num_kv_heads"] < b["num_heads"] for b in report["blocks"])):
        lines.append(f"KV cache per token: {kv['before']:,} -> {kv['after']:,} bytes")
    if report.get("importance") not in (None, "given"):
        lines.append(f"importance: {report['importance']}"
                     + (f"; output projections recovered by --compensate {report['compensate']}"
                        if report.get("compensate") else ""))
    fits = report.get("compensation") or []
    if fits:
        from collections import Counter
        chosen = Counter(f["mode"].split("@")[0] for f in fits)
        before = np.mean([f["held_out_error_before"] for f in fits])
        after = np.mean([f["held_out_error_after"] for f in fits])
        lines.append(f"compensation chosen per block on held-out calibration data: "
                     f"{', '.join(f'{m} x{n}' for m, n in sorted(chosen.items()))}; relative error of the "
                     f"blocks' output projections there {before:.3f} -> {after:.3f} (mean)")
    if report.get("gates_folded"):
        lines.append(f"head gates: {report['gates_folded']} folded into the output projections")
    if report.get("multiple_of"):
        lines.append(f"kept heads x head size rounded up to a multiple of {report['multiple_of']}")
    macs = report.get("macs")
    if macs:
        attn_b = sum(b["macs"]["before"] or 0 for b in report["blocks"])
        attn_a = sum(b["macs"]["after"] or 0 for b in report["blocks"])
        lines.append(f"MACs at batch {macs['batch']}, seq {macs['seq']}: {_count(macs['before'])} -> "
                     f"{_count(macs['after'])} (attention {_count(attn_b)} -> {_count(attn_a)}); "
                     f"ideal speed-up {macs['ideal_speedup']:.2f}x"
                     + (f" ({report['macs_note']})" if report.get("macs_note") else ""))
    elif report.get("macs_note"):
        lines.append(report["macs_note"])
    decode = report.get("decode_bytes_per_token")
    if decode:
        lines.append(f"decode, batch {decode['batch']}, {decode['context']:,} tokens cached: "
                     f"{_count(decode['before'])}B -> {_count(decode['after'])}B read per token (weights / batch + "
                     f"KV cache); ideal decode speed-up {decode['before'] / max(decode['after'], 1):.2f}x, where "
                     "memory bandwidth bounds it")
    if report.get("max_error") is not None:
        what = "projected" if dims else "masked"
        lines.append(f"pruned == {what} original: max error {report['max_error']:.2e} (relative to each output's "
                     "largest magnitude where it is above 1)" if report.get("max_error_relative", dims) else
                     f"pruned == masked original: max abs error {report['max_error']:.2e}")
    proof = report.get("proof") or {}
    if proof.get("run") == "segments":
        lines.append(f"proved with both models run in segments of at most {_size(proof['segment_bytes'])} of "
                     "weights each" + ("" if proof.get("note") else
                                       " (the whole models would not fit in memory, or --proof segments asked for it)"))
    elif proof.get("run") == "blocks":
        lines.append("proof: block by block (the whole models would not fit in memory, or --proof blocks asked for "
                     "it): each attention block cut out of both models and run alone on the same random inputs, every "
                     "node and weight outside the blocks compared with the original's")
    if proof.get("note"):
        lines.append(f"proof: {proof['note']}")
    if dims:
        source = report["dims_source"]
        lines.append("cut inside the heads: QK and OV ranks of each head's D dimensions, fitted from "
                     + ("the calibration data; the error is relative, on held-out calibration batches"
                        if source == "calibration" else
                        "the weights alone (no --calib: expect more loss; give calibration data)"))
        if any(b.get("qk_below_norms") for b in report["blocks"]):
            lines.append("below the q/k norms the QK cut keeps its pairs after the norms: the scores and the K cache "
                         "shrink, the Q and K projections keep their widths")
        through = [b["qk_through_norms"] for b in report["blocks"] if b.get("qk_through_norms")]
        if through:
            lines.append("through the q/k norms (RMS) the QK cut keeps its pairs in W_q" +
                         (" and W_k" if all(t["k"] for t in through) else "") + " and in the norms' weights, each "
                         "norm rescaled (its mean of squares by kept / D; a fused norm op's epsilon by D / kept and its "
                         "weight by sqrt(D / kept)): the projections, the scores and the K cache shrink"
                         + ("" if all(t["k"] for t in through) else
                            "; the one K head of a multi-query block is cut below its norm, at its broadcast (W_k "
                            "whole)"))
        if any(b.get("kept_positions") for b in report["blocks"]):
            lines.append("through a rotary embedding the QK cut keeps whole pairs of head-size positions, the same in "
                         "every head of a block (kept_positions in the report), and the cos/sin tables keep the same")
        speed = report.get("speed_target")
        if speed:
            fit = ", ".join(f"{v['name']} {v['measured_ms']:.3g} ms (predicted {v['predicted_ms']:.3g})"
                            for v in speed["variants"])
            lines.append(f"speed target {speed['target']:g}x on {speed['provider']}: original {speed['base_ms']:.3g} ms; "
                         f"variants timed beside it: {fit}")
            got = (f"measured {speed['measured']:.3f}x" if speed["measured"] is not None else
                   f"not measured ({speed['measured_note']})")
            lines.append(f"speed target: predicted {speed['predicted']:.3f}x, {got} (the written model timed beside "
                         "the original, interleaved)")
        if report.get("attention_ratio") is not None or speed:
            spent = report.get("budget") or {}
            cut = "cut" + (f" and compensated ({spent['compensated']})" if spent.get("compensated") else "")
            done = [(b["macs"]["before"], b["macs"]["after"]) for b in report["blocks"] if b.get("macs")]
            share = 1 - sum(a for _, a in done) / sum(b for b, _ in done) if done and all(b for b, _ in done) \
                else report["attention_ratio"]
            share = "some" if share is None else f"{share:.0%}"       # a speed target whose MACs went uncounted
            against = ("" if spent.get("whole_heads_loss") is None else
                       f" (whole heads alone: {spent['whole_heads_loss']:.3g})")
            if spent.get("chosen") == "heads":
                lines.append(f"attention budget: {share} of the attention MACs removed by "
                             f"whole heads alone: held-out loss {spent['whole_heads_loss']:.3g} with every block {cut}, "
                             "less than the cut inside the heads")
            elif spent.get("uniform"):
                lines.append(f"attention budget: {share} of the attention MACs removed by the same cut in every "
                             "block (the folder's config holds one head count and one head size), the one of least "
                             f"held-out loss: {spent.get('held_out_loss', float('nan')):.3g} with every block {cut}"
                             + against)
            else:
                lines.append(f"attention budget: {share} of the attention MACs removed where the "
                             "held-out loss per MAC was least (whole heads, QK ranks, OV ranks); held-out loss "
                             f"{spent.get('held_out_loss', float('nan')):.3g} with every block {cut}" + against)
    if all(len(b["kept_heads"]) == b["num_heads"] and b.get("qk_rank", b["head_dim"]) == b["head_dim"]
           and b.get("ov_rank", b["head_dim"]) == b["head_dim"] for b in report["blocks"]):
        lines.append("nothing removed: every block keeps all its heads")
    misses = report.get("misses") or []
    if misses:
        lines.append(f"left whole: {len(misses)} attention-like node(s) not matched, their heads not pruned "
                     "(onnxprune inspect lists them; --strict refuses this)")
        shown = misses if every_miss else misses[:5]
        lines += [f"  {m['op']} {m['node']}: {m['reason']}" if m["node"] else
                  f"  unnamed node of type {m['op']}: {m['reason']}" for m in shown]
        if len(misses) > len(shown):
            lines.append(f"  ... and {len(misses) - len(shown)} more (-v lists them all)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def graph_inputs(model) -> list[dict]:
    """The inputs a run feeds (initializers that double as inputs left out): name, element type and dims, a
    symbolic dim by its name (what ``--calib DATA.npz`` must hold, one array each)."""
    import onnx
    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        out.append({"name": i.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                    if t.elem_type else "?", "dims": dims})
    return out


def format_inspect(result: MatchResult, inputs: list[dict] | None = None) -> str:
    lines = []
    if inputs is not None:
        lines.append(f"{len(inputs)} graph inputs (--calib DATA.npz holds one array each, samples along axis 0)")
        lines += [f"  {i['name']}: {i['dtype']} [{', '.join(map(str, i['dims']))}]" for i in inputs]
    lines.append(f"{len(result.blocks)} attention blocks")
    for b in result.blocks:
        gqa = f", {b.num_kv_heads} KV heads" if b.num_kv_heads != b.num_heads else ""
        roles = ", ".join(f"{p.role}={p.weight}" for p in b.projections)
        lines.append(f"  [{b.index}] {b.name}: {b.num_heads} heads of {b.head_dim}{gqa} ({b.family}; {roles})")
    if result.misses:
        lines.append(f"{len(result.misses)} not matched")
        for m in result.misses:
            lines.append(f"  node {m.describe()}" if m.node else f"  {m.describe()}")
    return "\n".join(lines)


def inspect_json(result: MatchResult, inputs: list[dict] | None = None) -> dict:
    return {"inputs": inputs or [], "blocks": [{"index": b.index, "name": b.name, "family": b.family, "num_heads": b.num_heads,
                        "num_kv_heads": b.num_kv_heads, "head_dim": b.head_dim,
                        "kv_groups": [list(g) for g in b.kv_groups],
                        "projections": [{"role": p.role, "weight": p.weight, "bias": p.bias,
                                         "head_axis": p.head_axis} for p in b.projections],
                        "nodes": len(b.nodes)} for b in result.blocks],
            "misses": [{"node": m.node, "op": m.op, "reason": m.reason} for m in result.misses]}


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json_atomic(data: dict, path: Path):
    """Write ``data`` as JSON to ``path`` through a temporary file: never half a file in place."""
    StagedFile(Path(path), json_bytes(data)).publish()


def _tail(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: its end, which says the layer, after an ellipsis."""
    return name if len(name) <= width else "…" + name[-(width - 1):]
