"""benchmarks/plot_gates.py: the two halves of the gate read from sft_gate.json files, drawn side by side."""

from __future__ import annotations

import json

import pytest

from benchmarks import plot_gates


def _gate(tmp_path, name, by_n):
    path = tmp_path / name / "sft_gate" / "sft_gate.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"samples": 2, "problems": {"1 op": 3, "2 ops": 4}, "by_n": by_n}))
    return path


def test_gate_cells_pick_direct_on_easy_and_worked_on_hard(tmp_path, capsys):
    a = _gate(tmp_path, "a", {"1": {"1 op": {"direct": [0.5, 0.25, 4], "steps": [0.5, 1.0, 4]},
                                    "2 ops": {"steps": [1.0, 0.75, 8]}}})
    b = _gate(tmp_path, "b", {"1": {"1 op": {"steps": [1.0, 1.0, 6]}, "2 ops": {"direct": [1.0, 0.0, 8]}}})
    assert plot_gates.gate_cells(a, 1) == [(0.25, 4), (0.75, 8)]
    assert plot_gates.gate_cells(b, 1) == [(0.0, 0), (0.0, 0)]  # no direct easy, no worked hard answers
    with pytest.raises(SystemExit, match="no N = 4"):
        plot_gates.gate_cells(a, 4)
    out = tmp_path / "plots" / "gates.png"
    assert plot_gates.main([str(out), f"{tmp_path / 'a'}:first", str(tmp_path / "b")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "written" in capsys.readouterr().out
