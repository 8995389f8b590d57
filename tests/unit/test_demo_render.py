"""The closed-loop table printed to a log keeps every figure whole (rich folds and cuts cells to fit
its console's width: at 110 columns the loop's 15 columns showed "0.7…" for 0.748)."""

import io

from rich.console import Console

from flows.demo import LOOP_TABLE_WIDTH, _render

ROW = {"round": 1, "feedback from": "v1", "rows": 2580, "rejected samples": 1814, "budget stop": None,
       "candidate oracle": 0.748, "candidate KL": 9.54, "distinct-2 / base": 0.86, "rep-3 rise": 0.005,
       "oracle win vs champion": (0.67, 0.57, 0.75), "promoted": True, "champion": "2", "oracle": 0.748,
       "kl": 9.54, "gain": 0.526}  # the champion's oracle less the base's on its own evaluation's prompts
WHOLE = ("0.748", "9.54", "0.67 (0.57–0.75)", "+0.526", "+0.005", "86%")


def _printed(width: int) -> str:
    out = io.StringIO()
    _render([ROW], 0.222, console=Console(width=width, file=out, force_terminal=False))
    return out.getvalue()


def test_loop_table_width_keeps_every_figure_whole():
    text = _printed(LOOP_TABLE_WIDTH)
    assert all(figure in text for figure in WHOLE), text
    assert "…" not in text


def test_the_summary_width_would_cut_the_loop_table():
    text = _printed(110)
    assert not all(figure in text for figure in WHOLE)
