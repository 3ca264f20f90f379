"""The IR: action codec, CSV round trip, lowering, and that `validate` rejects broken schedules.

If a check here fails, start from paci/ir.py; the builders are tested in test_schedules.py.
"""

import subprocess
import sys

import pytest

from paci import ir
from paci.ir import Action, Op, ScheduleError, WeightPolicy
from paci.schedules import REGISTRY, build


def _schedule(rows: list[str], accumulation: int) -> ir.Schedule:
    return ir.from_rows([[Action.from_str(c) for c in row.split()] for row in rows], "test", accumulation,
                        WeightPolicy.NONE)


def test_action_string_round_trip():
    """Every op prints as <stage><letter><mb> and parses back to the same action."""
    for text in ["0F3", "1B2", "1I2", "12W40", "3U", "2SEND_F1", "1RECV_B2"]:
        assert str(Action.from_str(text)) == text
    assert Action.from_str("0F3") == Action(0, Op.F, 3)
    assert Action.from_str("2U") == Action(2, Op.U, None)


@pytest.mark.parametrize("bad", ["F3", "0X3", "0F", "0U3", "", "0 F 3"])
def test_action_parse_rejects_malformed(bad):
    """Malformed action strings raise ScheduleError, not an index or key error."""
    with pytest.raises(ScheduleError):
        Action.from_str(bad)


def test_op_letters_match_torch_pipelining():
    """F/I/W/B mean what torch.distributed.pipelining's current CSV letters mean (they changed once)."""
    pipelining = pytest.importorskip("torch.distributed.pipelining.schedules")
    ctype = pipelining._ComputationType
    assert ctype.FORWARD.value == Op.F.value
    assert ctype.FULL_BACKWARD.value == Op.B.value
    assert ctype.BACKWARD_INPUT.value == Op.I.value
    assert ctype.BACKWARD_WEIGHT.value == Op.W.value
    parsed = pipelining._Action.from_str("1I2")
    assert (parsed.stage_index, parsed.computation_type.value, parsed.microbatch_index) == (1, "I", 2)


@pytest.mark.parametrize("name", REGISTRY)
def test_csv_round_trip(name):
    """Writing a schedule to CSV and reading it back gives the same per-stage actions."""
    schedule = build(name, 3, 4, 2)
    again = ir.from_csv(ir.to_csv(schedule), weight_policy=schedule.weight_policy)
    assert again.rows() == schedule.rows()
    assert again.accumulation == schedule.accumulation


def test_csv_from_torch_without_updates_is_one_flush_step():
    """A torch CSV (no U, idle cells empty) reads as one step: a U is appended to every row."""
    text = "0F0,0F1,,,0B0,0B1\n,1F0,1B0,1F1,1B1,\n"
    schedule = ir.from_csv(text)
    assert schedule.accumulation == 2
    assert [str(a) for a in schedule.rows()[1]] == ["1F0", "1B0", "1F1", "1B1", "1U"]


@pytest.mark.parametrize("text, fragment", [
    ("0F0,0SEND_F0\n", "comm op"),
    ("0F0,0B0\n0F0,0B0\n", "belongs to stage 0"),
    ("0F0,0Q0\n", "cannot parse"),
    ("\n\n", "no actions"),
])
def test_csv_rejects_bad_files(text, fragment):
    """Malformed CSVs raise ScheduleError naming the problem."""
    with pytest.raises(ScheduleError, match=fragment):
        ir.from_csv(text)


def test_lower_inserts_matching_sends_and_receives():
    """Lowering puts RECV before and SEND after exactly the actions that talk to a neighbour."""
    lowered = [str(a) for a in ir.lower(build("1f1b", 3, 2).actions(1), 3)]
    assert lowered[:3] == ["1RECV_F0", "1F0", "1SEND_F0"]
    assert "1RECV_B0" in lowered and lowered[lowered.index("1RECV_B0") + 2] == "1SEND_B0"
    first = [str(a) for a in ir.lower(build("1f1b", 3, 2).actions(0), 3)]
    assert not any("RECV_F" in a or "SEND_B" in a for a in first)


@pytest.mark.parametrize("rows, accumulation, fragment", [
    (["0F0 0B0 0F1 0B1"], 2, "U is missing at the end"),
    (["0F0 0B0 0U 0F1 0B1 0U"], 2, "U after 1 weight-backwards"),
    (["0F0 0B0 0F1 0B1 0F2 0B2 0U"], 2, "a U is missing"),
    (["0F0 0F0 0B0 0U"], 1, "F of micro-batch 0 after F"),
    (["0B0 0F0 0U"], 1, "B of micro-batch 0 after nothing"),
    (["0F0 0W0 0I0 0U"], 1, "W of micro-batch 0 after F"),
    (["0F0 0F1 0B1 0U"], 1, "micro-batch 0 never finishes"),
    (["0F0 0B0 0U", "0F0 1B0 1U"], 1, "an action of stage 0 in stage 1"),
])
def test_validate_rejects_broken_stage_streams(rows, accumulation, fragment):
    """Each kind of per-stage mistake is reported with its stage and position."""
    with pytest.raises(ScheduleError, match=fragment) as info:
        ir.validate(_schedule(rows, accumulation))
    assert "stage" in str(info.value) and "positions" in str(info.value)


def test_validate_finds_deadlock_and_marks_it():
    """Crossed orders across stages deadlock; the grid marks where each stage is stuck."""
    schedule = _schedule(["0F0 0B0 0F1 0B1 0U", "1F1 1B1 1F0 1B0 1U"], 2)
    with pytest.raises(ScheduleError, match="deadlock") as info:
        ir.validate(schedule)
    message = str(info.value)
    assert "[0B0]" in message and "[1F1]" in message


def test_core_does_not_import_torch():
    """IR, builders, simulator, trace and report load without torch, so `paci simulate` starts instantly."""
    code = ("import sys, paci.ir, paci.schedules, paci.sim, paci.trace, paci.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
