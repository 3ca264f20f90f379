"""Reports on a trace: a text Gantt chart, a PNG Gantt chart, a Chrome/Perfetto trace, tables.

Every renderer reads the one `Trace` type, so a simulated run and a measured one are drawn the
same way and can be laid side by side. Nothing here prints; callers decide where text goes.

The text chart, cell by cell (``-`` is the rest of a busy block, ``.`` is idle)::

       time  0         5
    stage 0 |F0F1....B0--..B1-U|
    stage 1 |..F0B0--F1B1-U....|

A backward (B or I) whose micro-batch crossed optimizer steps since its forward on that stage
(drift Δ > 0) is drawn with a lowercase letter and one ``'`` per step crossed: ``b4'``.

Torch-free and cheap to import: matplotlib is imported only inside `render_png`, and it draws
through the Agg canvas without touching pyplot's global backend.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from paci.ir import COMPUTE_OPS, Op
from paci.files import atomic_write
from paci.trace import OP_CODE, Columns, Trace, TraceMetrics

_LETTERS = [op.value for op in COMPUTE_OPS]  # indexed by trace op code
_BACKWARD_CODES = (OP_CODE[Op.B], OP_CODE[Op.I])
_NAMES = {Op.F: "forward", Op.B: "backward", Op.I: "input-grad", Op.W: "weight-grad", Op.U: "optimizer step",
          Op.E: "evaluation"}
_COLORS = {Op.F: "#1f77b4", Op.B: "#ff7f0e", Op.I: "#008080", Op.W: "#2ca02c", Op.U: "#8b1a1a", Op.E: "#9467bd"}
_FILL, _IDLE = "-", "."
_MEASURED_US_PER_SECOND = 1e6
_SIMULATED_US_PER_UNIT = 1000.0


def _time_unit(trace: Trace) -> str:
    return "s" if trace.time_unit == "s" else "time units"


# ----------------------------------------------------------------------------------------------
# Text Gantt chart


class _Scale(NamedTuple):
    t0: float
    dt: float  # time per cell
    num_cells: int
    windowed: bool  # True when only the first num_cells * dt of the run is shown


def render_text(trace: Trace, width: int = 160) -> str:
    """A plain-text Gantt chart: one row per stage, a time ruler on top, a legend at the bottom.

    Scale: each action gets cells in proportion to its duration. If the whole run fits with every
    action labelled (letter and micro-batch number in its shortest block; "shortest" is the 10th
    percentile of non-zero durations), that scale is used; when all times are integers it is a
    whole number of cells per time unit. Otherwise, if one cell per shortest action fits (one cell
    per time unit for integer times), the whole run is squeezed into `width` and long numbers are
    dropped. Otherwise only the leading window of `width` cells is drawn at the labelled scale, and
    the legend says how much of the run that is.

    A zero-time action (U, by the simulator's default costs) takes the last cell of the block
    before it if that cell holds no label, else an idle cell beside it; at the very end of the run,
    one extra column if there is room; otherwise it is not drawn.
    A drifting backward gets its ' marks only if all of them fit, never a wrong count.
    """
    if width < 8:
        raise ValueError(f"width must be at least 8 cells, got {width}")
    columns = [trace.columns(s) for s in range(trace.num_stages)]
    metrics = trace.metrics()
    max_mb = max((int(c.microbatch.max(initial=0)) for c in columns), default=0)
    scale = _text_scale(columns, metrics.makespan, width, label_len=1 + len(str(max_mb)))
    prefix_len = len(f"stage {trace.num_stages - 1} |")
    lines = [("time".rjust(prefix_len - 2) + "  " + _ruler(scale)).rstrip()]
    rows, at_end = zip(*(_text_row(col, scale) for col in columns)) if columns else ((), ())
    if any(at_end) and scale.num_cells < width:  # one more column for zero-time actions at the very end
        rows = [row + [letter or " "] for row, letter in zip(rows, at_end)]
    for stage, row in enumerate(rows):
        lines.append(f"stage {stage:>{len(str(trace.num_stages - 1))}} |" + "".join(row) + "|")
    lines += _legend(trace, columns, scale, metrics, width + prefix_len)
    return "\n".join(lines)


def _text_scale(columns: Sequence[Columns], makespan: float, width: int, label_len: int) -> _Scale:
    starts = [c.start for c in columns if len(c.start)]
    if not starts or makespan <= 0:
        return _Scale(0.0, 1.0, 0, False)
    t0 = float(min(s[0] for s in starts))
    durations = np.concatenate([c.end - c.start for c in columns])
    busy = durations[durations > 0]
    shortest = float(np.percentile(busy, 10, method="lower")) if busy.size else makespan
    times = np.concatenate([np.concatenate((c.start, c.end)) - t0 for c in columns])
    integer = bool(np.all(times == np.round(times)))
    labelled = shortest / label_len
    if integer:  # a whole number of cells per time unit, or of time units per cell
        labelled = 1.0 / math.ceil(label_len / shortest) if shortest < label_len else float(shortest // label_len)
    if makespan / labelled <= width:
        dt = labelled
    elif integer and makespan <= width:
        dt = 1.0
    elif makespan / shortest <= width:
        dt = makespan / width
    else:
        return _Scale(t0, labelled, width, True)
    return _Scale(t0, dt, min(width, math.ceil(makespan / dt - 1e-9)), False)


def _cell(t: np.ndarray | float, scale: _Scale) -> np.ndarray:
    """The cell boundary nearest to time t (rounding half up, so a 1-cell action never vanishes)."""
    return np.floor((np.asarray(t) - scale.t0) / scale.dt + 0.5).astype(np.int64)


def _text_row(col: Columns, scale: _Scale) -> tuple[list[str], str]:
    """The row's cells, and the letter of a zero-time action at the very end that found no room."""
    cells = [_IDLE] * scale.num_cells
    at_end = ""
    first, last = _cell(col.start, scale), _cell(col.end, scale)
    points = []
    for i in np.flatnonzero(first <= scale.num_cells):
        a, b = int(first[i]), min(int(last[i]), scale.num_cells)
        if b <= a:
            points.append((a, _LETTERS[col.op[i]]))
            continue
        cells[a:b] = _block_label(col, i, b - a).ljust(b - a, _FILL)
    for a, letter in points:
        neighbours = [c for c in (a - 1, a) if 0 <= c < scale.num_cells]
        free = [c for c in neighbours if cells[c] == _FILL] or [c for c in neighbours if cells[c] == _IDLE]
        if free:
            cells[free[0]] = letter
        elif a == scale.num_cells:
            at_end = letter
    return cells, at_end


def _block_label(col: Columns, i: int, room: int) -> str:
    """Letter, then the micro-batch number if it fits whole, then one ' per update crossed if all fit."""
    letter = _LETTERS[col.op[i]]
    drift = int(col.drift[i])
    if drift > 0:
        letter = letter.lower()
    mb = int(col.microbatch[i])
    if mb < 0 or 1 + len(str(mb)) > room:
        return letter
    label = letter + str(mb)
    return label + "'" * drift if len(label) + drift <= room else label


def _nice_step(x: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least x."""
    power = 10.0 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= x * (1 - 1e-9))


def _ruler(scale: _Scale) -> str:
    """Time labels placed at their cells, about every ten cells, never overlapping."""
    if not scale.num_cells:
        return ""
    step = _nice_step(8 * scale.dt)
    ruler = [" "] * scale.num_cells
    free_from = 0
    for j in range(int(scale.num_cells * scale.dt / step) + 1):
        at = int(_cell(scale.t0 + j * step, scale))
        text = f"{j * step:.6g}"
        if at >= free_from and at + len(text) <= scale.num_cells:
            ruler[at:at + len(text)] = text
            free_from = at + len(text) + 1
    return "".join(ruler).rstrip()


def _legend(trace: Trace, columns: Sequence[Columns], scale: _Scale, metrics: TraceMetrics,
            width: int) -> list[str]:
    present = sorted({int(code) for c in columns for code in np.unique(c.op)})
    items = [f"{_LETTERS[code]} {_NAMES[COMPUTE_OPS[code]]}" for code in present]
    items += [f"{_FILL} rest of a block", f"{_IDLE} idle"]
    if any(np.any((c.op == OP_CODE[Op.U]) & (c.end == c.start)) for c in columns):
        items.append("a zero-time U takes a cell beside its time")
    if metrics.max_drift > 0:
        items.append("lowercase b/i = backward whose micro-batch crossed optimizer steps since its forward "
                     "(Δ > 0), one ' per step where room allows: b4'' has Δ = 2")
    unit = _time_unit(trace)
    cell_unit = "time unit" if scale.dt == 1 and unit == "time units" else unit
    stats = [f"1 cell = {scale.dt:.4g} {cell_unit}", f"makespan {metrics.makespan:.6g} {unit}",
             f"bubble {metrics.bubble_fraction:.1%}", f"max Δ {metrics.max_drift}"]
    if scale.windowed:
        shown = scale.num_cells * scale.dt
        stats.append(f"showing only the first {shown:.6g} of {metrics.makespan:.6g} {unit} "
                     f"({shown / metrics.makespan:.1%}); widen the chart to see more")
    return _wrap(items, width) + _wrap(stats, width)


def _wrap(items: Sequence[str], width: int, sep: str = " | ") -> list[str]:
    """Join items with `sep` into lines of at most `width` characters; long items wrap by words."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines += textwrap.wrap(item, width)
    return lines


# ----------------------------------------------------------------------------------------------
# PNG Gantt chart


def render_png(trace: Trace, path: str | os.PathLike, title: str | None = None, max_actions: int = 4000) -> None:
    """Draw the trace as a Gantt chart PNG at `path` (written atomically).

    Stages are rows, stage 0 on top; F blue, B orange, I teal, W green, U dark red (a zero-time U
    is a vertical tick). Boxes wide enough show their micro-batch number; a backward with Δ > 0 is
    hatched and labelled Δ. Traces with more than `max_actions` actions are cut to the leading
    window of time holding about that many, and the title says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [trace.columns(s) for s in range(trace.num_stages)]
    metrics = trace.metrics()
    t0, t1, cut, note = _png_window(trace, columns, metrics.makespan, max_actions)
    busy = np.concatenate([c.end - c.start for c in columns])
    shortest = float(np.percentile(busy[busy > 0], 10)) if np.any(busy > 0) else t1 - t0
    boxes_across = (t1 - t0) / shortest if shortest > 0 else 1.0
    fig = Figure(figsize=(float(np.clip(2 + 0.32 * boxes_across, 8, 30)),
                          float(np.clip(1.6 + 0.5 * trace.num_stages, 3, 14))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(t0, t1 + 0.01 * (t1 - t0 or 1.0))  # a margin, so a zero-time U at the very end shows
    ax.set_ylim(trace.num_stages - 0.5, -0.5)
    fig.canvas.draw()  # fixes the axes size, so box widths in pixels are known
    px_per_unit = ax.bbox.width / (ax.get_xlim()[1] - ax.get_xlim()[0])
    edge = 0.6 if shortest * px_per_unit >= 6 else 0.0  # no outlines on boxes too thin to see
    for stage, col in enumerate(columns):
        _draw_stage(ax, stage, col, cut, px_per_unit, edge)
    ax.legend(handles=_png_legend(columns, metrics.max_drift), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    ax.set_yticks(range(trace.num_stages), [f"stage {s}" for s in range(trace.num_stages)])
    ax.set_xlabel("time (s)" if trace.time_unit == "s" else "time units")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    heading = title or (f"{trace.name} ({trace.kind}): {trace.num_stages} stages, {trace.num_microbatches} "
                        f"micro-batches, makespan {metrics.makespan:.4g}, bubble {metrics.bubble_fraction:.1%}, "
                        f"max Δ {metrics.max_drift}")
    ax.set_title(heading + note)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _png_window(trace: Trace, columns: Sequence[Columns], makespan: float,
                max_actions: int) -> tuple[float, float, float, str]:
    """(t0, t1, cut, note): the time span drawn, the start time from which actions are left out
    (inf when all are drawn) and a title line saying so."""
    starts = np.concatenate([c.start for c in columns])
    t0 = float(starts.min(initial=0.0))
    if starts.size <= max_actions:
        return t0, t0 + makespan, math.inf, ""
    cut = float(np.partition(starts, max_actions)[max_actions])
    shown = int(np.count_nonzero(starts < cut))
    return t0, cut, cut, f"\nfirst {shown:,} of {starts.size:,} actions (t < {cut - t0:.4g} {_time_unit(trace)})"


def _png_legend(columns: Sequence[Columns], max_drift: int) -> list:
    from matplotlib.patches import Patch

    present = sorted({int(code) for c in columns for code in np.unique(c.op)})
    handles = [Patch(facecolor=_COLORS[COMPUTE_OPS[c]], label=f"{_LETTERS[c]} {_NAMES[COMPUTE_OPS[c]]}")
               for c in present]
    if max_drift > 0:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="backward with Δ > 0"))
    return handles


def _draw_stage(ax, stage: int, col: Columns, cut: float, px_per_unit: float, edge: float) -> None:
    """One row: bars grouped by (op, drifting) for speed, zero-time actions as ticks, labels."""
    height = 0.8
    keep = col.start < cut
    for code in np.unique(col.op[keep]):
        op = COMPUTE_OPS[code]
        for drifting in (False, True):
            mask = keep & (col.op == code) & ((col.drift > 0) == drifting)
            wide = mask & (col.end > col.start)
            if np.any(wide):
                spans = list(zip(col.start[wide], col.end[wide] - col.start[wide]))
                style = {"hatch": "///", "edgecolor": "#3a0000"} if drifting else {"edgecolor": "white"}
                ax.broken_barh(spans, (stage - height / 2, height), facecolors=_COLORS[op], linewidth=edge, **style)
            ticks = mask & (col.end == col.start)
            if np.any(ticks):
                ax.vlines(col.start[ticks], stage - height / 2, stage + height / 2, colors=_COLORS[op], linewidth=2.5)
    for i in np.flatnonzero(keep & (col.microbatch >= 0)):
        width_px = (col.end[i] - col.start[i]) * px_per_unit
        text = str(col.microbatch[i])
        if col.drift[i] > 0 and width_px >= 7 * (len(text) + 3):
            text += f" Δ{col.drift[i]}"
        if width_px >= 7 * len(text) + 2:
            ax.text((col.start[i] + col.end[i]) / 2, stage, text, ha="center", va="center", fontsize=8,
                    color="white" if col.drift[i] == 0 else "black", clip_on=True,
                    bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "linewidth": 0} if col.drift[i] else None)


# ----------------------------------------------------------------------------------------------
# Chrome / Perfetto trace


def write_chrome_trace(traces: Trace | Sequence[Trace], path: str | os.PathLike,
                       time_scale_us: float | None = None, max_actions: int = 200_000) -> None:
    """Write traces as Chrome trace JSON (chrome://tracing, ui.perfetto.dev), atomically.

    Each trace is a process (pid 0, 1, ... in the order given) named after its kind and schedule,
    each stage a thread "stage s"; each action an "X" event named like F3 / B3 / U with category
    the op letter and args microbatch, version and (backwards) drift. Measured traces are in
    seconds (1 s = 1e6 µs); simulated ones in abstract units, 1 unit = `time_scale_us` µs
    (default 1000). A trace with more than `max_actions` actions keeps its leading window of time
    holding about that many (the metadata event "window" says where it was cut).
    """
    if isinstance(traces, Trace):
        traces = [traces]
    events: list[dict] = []
    for pid, trace in enumerate(traces):
        label = "measured" if trace.kind == "measured" else "simulated (predicted)"
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{label}: {trace.name}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
        if trace.time_unit == "s":
            scale = _MEASURED_US_PER_SECOND
        else:
            scale = _SIMULATED_US_PER_UNIT if time_scale_us is None else float(time_scale_us)
        columns = [trace.columns(s) for s in range(trace.num_stages)]
        _, _, cut, note = _png_window(trace, columns, 0.0, max_actions)
        if note:
            events.append({"name": "window", "ph": "M", "pid": pid, "args": {"name": note.strip()}})
        for stage, col in enumerate(columns):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": stage,
                           "args": {"name": f"stage {stage}"}})
            keep = col.start < cut
            events.extend(_chrome_events(Columns(*(c[keep] for c in col)), pid, stage, scale))
    atomic_write(path, lambda tmp: _dump_json({"traceEvents": events, "displayTimeUnit": "ms"}, tmp))


def _chrome_events(col: Columns, pid: int, stage: int, scale: float) -> list[dict]:
    events = []
    for code, mb, start, end, version, drift in zip(col.op.tolist(), col.microbatch.tolist(), col.start.tolist(),
                                                    col.end.tolist(), col.version.tolist(), col.drift.tolist()):
        letter = _LETTERS[code]
        args = {"microbatch": None if mb < 0 else mb, "version": version}
        if code in _BACKWARD_CODES:
            args["drift"] = drift
        events.append({"name": letter if mb < 0 else f"{letter}{mb}", "cat": letter, "ph": "X", "pid": pid,
                       "tid": stage, "ts": start * scale, "dur": (end - start) * scale, "args": args})
    return events


def _dump_json(payload: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# Curves


def plot_curves(curves: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *, xlabel: str,
                ylabel: str, title: str = "", markers: Sequence[str] = ()) -> None:
    """Line plot of named (x, y) series, e.g. train and validation loss against steps (atomic PNG).

    Series named in `markers` are drawn as points joined by a line (sparse ones, such as
    validation rounds); the rest as plain lines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if name in markers else None, markersize=4, linewidth=1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


# ----------------------------------------------------------------------------------------------
# Tables


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """An aligned plain-text table: a header, a rule, one line per row.

    `columns` are (key, header, format spec), e.g. ("bubble", "bubble", ".3f"). Columns whose spec
    is numeric (d, f, e, g, %, ...) are right-aligned, the rest left-aligned; a missing or None
    value prints as "-".
    """
    numeric = [spec[-1:] in tuple("bcdoxXeEfFgGn%") for _, _, spec in columns]
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(line[j]) for line in cells) for j in range(len(columns))]

    def render(line: list[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(cells[0]), rule] + [render(line) for line in cells[1:]])
