"""Reports: the text Gantt chart, the PNG, the Chrome trace and tables say what the trace says.

The golden chart below was checked by hand against the simulated 1F1B timeline (P=2, m=2, F=1,
B=2): stage 0 runs F0 [0,1) F1 [1,2) B0 [4,6) B1 [7,9) U@9; stage 1 F0 [1,2) B0 [2,4) F1 [4,5)
B1 [5,7) U@7; two cells per time unit.
"""

import json
import re
import subprocess
import sys

import pytest

from paci.report import format_table, render_png, render_text, write_chrome_trace
from paci.schedules import build
from paci.sim import CostModel, simulate
from paci.trace import Trace

GOLDEN_1F1B = """\
   time  0         5
stage 0 |F0F1....B0--..B1-U|
stage 1 |..F0B0--F1B1-U....|
F forward | B backward | U optimizer step | - rest of a block | . idle | a zero-time U takes a cell beside its time
1 cell = 0.5 time units | makespan 9 time units | bubble 33.3% | max Δ 0"""


def _trace(name, stages, microbatches, steps=1, costs=(1, 2)):
    return simulate(build(name, stages, microbatches, steps), CostModel.per_stage(stages, *costs)).trace


def _as_measured(trace, seconds_per_unit, origin):
    """The same timeline as a measured trace: times in seconds from a wall-clock origin."""
    out = Trace(trace.name, trace.num_stages, trace.num_microbatches, trace.weight_policy, kind="measured")
    for e in trace.events():
        out.stages[e.stage].append(e.op, e.microbatch, origin + e.start * seconds_per_unit,
                                   origin + e.end * seconds_per_unit, e.version)
    return out


def _rows(chart):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^stage +(\d+) \|(.*)\|$", chart, re.MULTILINE)}


def test_render_text_1f1b_matches_golden():
    """1F1B P=2 m=2 under F=1, B=2 renders exactly the hand-checked chart."""
    assert render_text(_trace("1f1b", 2, 2)) == GOLDEN_1F1B


def test_render_text_depends_on_shape_not_unit_or_origin():
    """A measured trace (seconds, starting at wall-clock time) draws the same rows, labelled in s."""
    measured = render_text(_as_measured(_trace("1f1b", 2, 2), 0.01, 1000.0))
    assert _rows(measured) == _rows(GOLDEN_1F1B)
    assert "makespan 0.09 s" in measured


def test_render_text_labels_every_action_for_unit_costs():
    """PACI P=4 m=4, 2 steps, F=1 B=2: every F and B appears once with its micro-batch number."""
    trace = _trace("paci", 4, 4, steps=2)
    rows = _rows(render_text(trace))
    for stage, row in rows.items():
        drawn = re.findall(r"[FBfb]\d+", row)
        expected = sorted(f"{e.op.value}{e.microbatch}" for e in trace.events(stage) if e.op.value in "FB")
        assert sorted(d.upper() for d in drawn) == expected
        assert row.count("U") == 2  # both optimizer steps are visible


def test_render_text_shows_an_update_that_ends_the_run():
    """ZB-H1's U at the very end, after a fully labelled W, still shows (in one extra column)."""
    rows = _rows(render_text(_trace("zb-h1", 4, 4, costs=(1, 2, 1))))
    assert all(row.endswith("W3U") and row.count("U") == 1 for row in rows.values())


def test_render_text_marks_drift_only_on_drifting_backwards():
    """A backward with Δ>0 is lowercase with one ' per update crossed; a Δ=0 one is plain."""
    trace = _trace("paci", 4, 4, steps=2)
    v_f, v_b = trace.versions(0)
    assert v_b[4] - v_f[4] == 1 and v_b[0] - v_f[0] == 0
    rows = _rows(render_text(trace))
    assert "b4'" in rows[0] and "b4''" not in rows[0]
    assert "B0" in rows[0] and "b0" not in rows[0]
    assert not re.search(r"[bi]", rows[3])  # the last stage never drifts
    naive = _trace("async-1f1b", 4, 4)
    v_f, v_b = naive.versions(0)
    assert list(v_b - v_f) == [0, 1, 2, 3]
    naive_row = _rows(render_text(naive))[0]
    assert "b1'U" in naive_row and "b2''U" in naive_row
    assert re.search(r"b3[^']", naive_row)  # 3 marks do not fit in 4 cells: none, not a wrong count


@pytest.mark.parametrize("width", [40, 80, 160])
@pytest.mark.parametrize("costs", [(1, 2), (1.3, 2.7)])
def test_render_text_respects_width_on_long_runs(width, costs):
    """A long run never draws more than `width` cells, and the legend says only a window is shown."""
    chart = render_text(_trace("paci", 4, 8, steps=50, costs=costs), width=width)
    label = len("stage 0 |")
    assert all(len(line) <= width + label + 1 for line in chart.splitlines())
    assert all(len(row) <= width for row in _rows(chart).values())
    assert "showing only the first" in chart


def test_render_png_writes_a_valid_png(tmp_path):
    """render_png writes a non-empty PNG (also when windowed) and leaves no temp file behind."""
    small, windowed = tmp_path / "paci.png", tmp_path / "long.png"
    render_png(_trace("paci", 4, 4, steps=2), small)
    render_png(_trace("zb-h1", 4, 8, costs=(1, 2, 1)), windowed, title="zb-h1", max_actions=50)
    for path in (small, windowed):
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.png", "paci.png"]


def test_write_chrome_trace_events_names_and_scales(tmp_path):
    """One X event per action per trace; pids/tids named; seconds x1e6, units x1000 (or as given)."""
    simulated = _trace("paci", 4, 4, steps=2)
    measured = _as_measured(simulated, 0.5, 0.0)
    path = tmp_path / "trace.json"
    write_chrome_trace([measured, simulated], path)
    events = json.loads(path.read_text())["traceEvents"]
    meta = {(e["name"], e["pid"], e.get("tid")): e["args"]["name"] for e in events if e["ph"] == "M"
            and e["name"] in ("process_name", "thread_name")}
    assert meta[("process_name", 0, None)] == "measured: paci"
    assert meta[("process_name", 1, None)] == "simulated (predicted): paci"
    assert all(meta[("thread_name", pid, s)] == f"stage {s}" for pid in (0, 1) for s in range(4))
    complete = [e for e in events if e["ph"] == "X"]
    num_actions = sum(len(st) for st in simulated.stages)
    assert [sum(e["pid"] == pid for e in complete) for pid in (0, 1)] == [num_actions, num_actions]
    by_key = {(e["pid"], e["tid"], e["name"]): e for e in complete}
    f3 = next(e for e in simulated.events(1) if e.op.value == "F" and e.microbatch == 3)
    assert by_key[(1, 1, "F3")]["ts"] == pytest.approx(f3.start * 1000)
    assert by_key[(1, 1, "F3")]["dur"] == pytest.approx((f3.end - f3.start) * 1000)
    assert by_key[(0, 1, "F3")]["ts"] == pytest.approx(f3.start * 0.5 * 1e6)
    assert by_key[(1, 0, "B4")]["args"] == {"microbatch": 4, "version": 1, "drift": 1}
    assert by_key[(1, 0, "U")]["cat"] == "U"
    write_chrome_trace(simulated, path, time_scale_us=10.0)
    single = json.loads(path.read_text())["traceEvents"]
    assert next(e for e in single if e["name"] == "F3" and e["tid"] == 1)["ts"] == pytest.approx(f3.start * 10)


def test_format_table_aligns_columns_and_prints_none_as_dash():
    """Numbers right-aligned, strings left-aligned, None as '-', every line the same columns."""
    rows = [{"name": "paci", "bubble": 0.01234, "steps": 12}, {"name": "1f1b-long", "bubble": None, "steps": 3}]
    table = format_table(rows, [("name", "schedule", "s"), ("bubble", "bubble", ".3f"), ("steps", "steps", "d")])
    assert table.splitlines() == [
        "schedule   bubble  steps",
        "---------  ------  -----",
        "paci        0.012     12",
        "1f1b-long       -      3",
    ]


def test_report_import_is_light():
    """Importing paci.report pulls in neither matplotlib nor torch."""
    code = "import sys, paci.report; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
