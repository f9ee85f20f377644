"""What a lowered or compiled XLA program does per step, counted with its loops' trip counts.

XLA's `cost_analysis()` counts the body of every while loop once (measured: halving a scan's trip
count or splitting a batch into 2 microbatches leaves it unchanged, unrolling the layers raises it),
and a train step is nested loops (microbatches, layers, cross-entropy chunks). Two counts here take
the loops into account:

- `matmul_flops`: FLOPs of every `dot_general` and `ragged_dot` in the StableHLO a function lowers
  to, before partitioning (global shapes; inside `shard_map` bodies the per-shard shapes times the
  manual axes' sizes), each weighted by the trip counts of the loops around it.
- `collective_bytes`: bytes of the collectives in the compiled, partitioned HLO of one device,
  weighted the same way.

`expert_weight_ops` counts, in the compiled HLO, how the expert weights' gradients are computed:
grouped Pallas kernels, or dense convolutions over every local expert.

A loop whose trip count is not a constant (decode's `while` over a traced step count) counts once:
its figures are per iteration.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np
from jaxlib.mlir import ir

_MEGABLOX = re.compile(r"t?gmm(_\d+)?$")  # the functions megablox's jitted kernels lower to
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# ----------------------------------------------------------------------------- StableHLO FLOPs


def _shape(value) -> list[int]:
    return list(ir.RankedTensorType(value.type).shape)


def _constant_int(value) -> int | None:
    """The integer a scalar `stablehlo.constant` holds, else None."""
    owner = value.owner
    if not isinstance(owner, ir.Operation) and hasattr(owner, "operation"):
        owner = owner.operation
    if not isinstance(owner, ir.Operation) or owner.name != "stablehlo.constant":
        return None
    attr = owner.attributes["value"]
    try:
        return int(ir.DenseIntElementsAttr(attr)[0])
    except (ValueError, TypeError):
        return None


def _trip_count(cond: ir.Region) -> int | None:
    """N for a `while` whose condition is `counter < N` with N a constant (jax's scan and fori)."""
    for block in cond.blocks:
        for op in block.operations:
            op = op.operation
            if op.name == "stablehlo.compare" and "LT" in str(op.attributes["comparison_direction"]):
                return _constant_int(op.operands[1])
    return None


def matmul_flops(module: ir.Module, mesh_shape: dict[str, int]) -> dict[str, float]:
    """{'flops': matmul FLOPs of `module`'s main function, loops weighted by trip count, global
    (all devices together); 'loops_without_trip_count': how many `while` loops counted once;
    'kernels_without_cost_estimate': Pallas TPU kernels (splash attention) whose FLOPs are not
    counted, as they carry no cost estimate; 'grouped_flops': the part of 'flops' in grouped
    matmuls (ragged_dot, megablox's gmm and tgmm), counted over every row}. A conditional counts
    its costliest branch, so the causal tiles blockwise attention skips count as computed.

    dot_general: 2 x result elements x contracted elements. ragged_dot: the same, divided by the
    group count when the ragged dimension is contracted (each group contracts only its own rows).
    `mesh_shape` gives the sizes of the axes `shard_map` bodies are manual over.
    """
    funcs = {op.attributes["sym_name"].value: op for op in module.body.operations
             if "sym_name" in op.attributes}
    # Every count is a pair: (all matmul FLOPs, the grouped-matmul part of them).
    memo: dict[str, np.ndarray] = {}
    unknown, opaque = [0], [0]

    def region(r: ir.Region, func: str) -> np.ndarray:
        return sum((operation(op.operation, func) for block in r.blocks for op in block.operations), np.zeros(2))

    def operation(op: ir.Operation, func: str) -> np.ndarray:
        name = op.name
        if name == "stablehlo.dot_general":
            dims = str(op.attributes["dot_dimension_numbers"])
            contracting = re.search(r"lhs_contracting_dimensions = \[([\d, ]*)\]", dims)
            lhs = _shape(op.operands[0])
            k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i.strip()) if contracting else 1
            return np.array([2.0 * math.prod(_shape(op.results[0])) * k, 0.0])
        if name == "chlo.ragged_dot":
            dims = str(op.attributes["ragged_dot_dimension_numbers"])
            contracting = [int(i) for i in re.search(r"lhs_contracting_dimensions = \[([\d, ]*)\]", dims).group(1).split(",")]
            ragged = [int(i) for i in re.search(r"lhs_ragged_dimensions = \[([\d, ]*)\]", dims).group(1).split(",")]
            lhs = _shape(op.operands[0])
            flops = 2.0 * math.prod(_shape(op.results[0])) * math.prod(lhs[i] for i in contracting)
            flops = flops / _shape(op.operands[2])[0] if set(ragged) & set(contracting) else flops
            return np.array([flops, flops])
        if name == "stablehlo.while":
            n = _trip_count(op.regions[0])
            if n is None:
                unknown[0] += 1
            return (1 if n is None else n) * region(op.regions[1], func)
        if name in ("func.call", "call"):
            callee = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
            if callee not in memo:
                memo[callee] = region(funcs[callee].regions[0], callee)
            return memo[callee]
        if name == "stablehlo.custom_call" and "tpu_custom_call" in str(op.attributes["call_target_name"]):
            # A Pallas kernel: its FLOPs are those of the cost estimate it was lowered with, if any
            # (the MLIR text escapes the JSON's quotes as \22).
            config = str(op.attributes["backend_config"]).replace("\\22", '"')
            estimate = re.search(r'cost_estimate\\?": ?\{[^}]*?flops\\?": ?(\d+)', config)
            if estimate is None:
                opaque[0] += 1
                return np.zeros(2)
            flops = float(estimate.group(1))
            # megablox's gmm / tgmm estimate 2 x rows x k x n: every row, as ragged_dot is counted.
            return np.array([flops, flops if _MEGABLOX.match(func) else 0.0])
        if name in ("stablehlo.case", "stablehlo.if"):  # one branch runs: count the costliest
            return max((region(r, func) for r in op.regions), key=lambda c: c[0], default=np.zeros(2))
        inner = sum(region(r, func) for r in op.regions)
        if name == "sdy.manual_computation" and inner[0]:
            axes = re.findall(r'"(\w+)"', str(op.attributes["manual_axes"]))
            inner *= math.prod(mesh_shape[a] for a in axes)
        return inner

    flops, ragged = region(funcs["main"].regions[0], "main")
    return {"flops": float(flops), "loops_without_trip_count": unknown[0],
            "kernels_without_cost_estimate": opaque[0], "grouped_flops": float(ragged)}


# ------------------------------------------------------------------------- compiled HLO bytes

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start|-done)?\("
)
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _type_bytes(text: str) -> float:
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(text))


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes per step of each collective kind in one device's compiled HLO (`compiled.as_text()`):
    the result buffer of every all-gather / all-reduce / reduce-scatter / all-to-all /
    collective-permute (for async pairs, the `-done`'s), times the trip counts of the loops
    around it (every branch of a conditional counts). Also 'loops_without_trip_count'."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.rstrip() == "}":
            current = None
        elif current is not None and line[:1] not in (" ", "\t") and comps[current]:
            # A Pallas kernel's backend_config spans lines (its JSON holds newlines): one instruction.
            comps[current][-1] += line
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    def trip(cond: str) -> int | None:
        """N for a condition `counter < N`: its one s32 constant (the compare may sit in a fusion)."""
        text = "\n".join(comps.get(cond, []))
        consts = re.findall(r"= s32\[\]\S* constant\((\d+)\)", text)
        return int(consts[0]) if len(consts) == 1 and "direction=LT" in "\n".join(
            "\n".join(comps.get(c, [])) for c in [cond, *re.findall(r"calls=%([\w.\-]+)", text)]) else None

    memo: dict[str, dict[str, float]] = {}
    unknown = [0]

    def total(comp: str) -> dict[str, float]:
        if comp in memo:
            return memo[comp]
        out: dict[str, float] = defaultdict(float)
        for line in comps[comp]:
            m = _COLLECTIVE.match(line)
            if m and m.group(3) != "-start":
                out[m.group(2)] += _type_bytes(m.group(1))
            children: list[tuple[str, float]] = []
            w = re.search(r" while\(.*condition=%([\w.\-]+), body=%([\w.\-]+)", line)
            if w:
                n = trip(w.group(1))
                unknown[0] += n is None
                children.append((w.group(2), 1 if n is None else n))
            elif re.search(r" (fusion|call|async-start)\(", line):
                children += [(c, 1) for c in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)]
            b = re.search(r"branch_computations=\{([^}]*)\}", line)
            if b:
                children += [(c.strip().lstrip("%"), 1) for c in b.group(1).split(",")]
            for child, n in children:
                for k, v in total(child).items():
                    out[k] += n * v
        memo[comp] = dict(out)
        return memo[comp]

    result = {k: total(entry).get(k, 0.0) for k in COLLECTIVES}
    result["loops_without_trip_count"] = unknown[0]
    return result


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (custom-call|convolution|dot)\((.*)$")


def expert_weight_ops(hlo_text: str, shapes: set[tuple[int, ...]]) -> dict[str, int]:
    """Instructions of one device's compiled HLO whose result has a local expert weight's shape
    (`shapes`, e.g. {(El, D, I), (El, I, D)}): the weight gradients. 'grouped_kernels': Pallas /
    Mosaic kernels (`tpu_custom_call`: megablox's `tgmm`); 'dense_convolutions': convolutions and
    dots, which compute every (row, expert) product, the rows outside an expert's group masked to
    zero (libtpu's lowering of `ragged_dot`'s weight gradient). Instructions, not executions: a
    loop body counts once."""
    counts = {"grouped_kernels": 0, "dense_convolutions": 0}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m is None or tuple(int(d) for d in m.group(3).split(",") if d) not in shapes:
            continue
        if m.group(4) == "custom-call":
            counts["grouped_kernels"] += 'custom_call_target="tpu_custom_call"' in m.group(5)
        else:
            counts["dense_convolutions"] += 1
    return counts
