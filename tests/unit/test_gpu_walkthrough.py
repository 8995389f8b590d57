"""benchmarks/gpu_walkthrough.py (issue 19 on a GPU), checked on the CPU without running the blocks:
it runs the README walk-through's own blocks with the GPU example config, and reads the run's summary."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks import gpu_walkthrough as walk

ROOT = Path(__file__).resolve().parents[2]


def test_the_blocks_are_the_walk_through_section_of_the_readme_in_order():
    readme = (ROOT / "README.md").read_text()
    blocks = walk.walkthrough_blocks(readme)
    assert [lang for lang, _, _ in blocks] == ["bash", "bash", "python"]
    first, promote, load = (body for _, body, _ in blocks)
    assert "alignflow run --config configs/examples/qwen-lora-dpo.yaml" in first
    assert "alignflow promote" in promote
    assert "@champion" in load
    lines = readme.splitlines()
    for lang, body, line in blocks:  # README line numbers of each block's opening fence, as CI's test names them
        assert lines[line - 1] == f"```{lang}" and lines[line] == body.splitlines()[0]
    assert all(line > lines.index(next(x for x in lines if x.startswith(walk.SECTION))) for _, _, line in blocks)


def test_the_clone_puts_an_alignflow_launcher_of_this_python_on_path(tmp_path):
    clone = walk.make_clone(tmp_path, "/usr/bin/env python3")
    assert (clone / "configs/examples/qwen-lora-dpo.yaml").exists()
    out = subprocess.run(["bash", "-c", "source .venv/bin/activate && command -v alignflow"], cwd=clone,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(clone / ".venv/bin/alignflow")
    assert "-m flows.cli" in Path(out).read_text()


def test_the_pipeline_summary_is_read_from_the_printed_table():
    printed = """\
│ base model         │ ready  │     2.1 │                                                          │
│ reward model       │ ran    │    58.0 │ eval/accuracy=0.83, train s=37.2                         │
│ fine-tune (dpo)    │ ran    │   122.3 │ eval/rewards/accuracy=1, train s=106.1                   │
│ register + promote │ ran    │     5.9 │ version=1, promoted=False                                │
wall 225.9 s, stage work 223.1 s, orchestration 2.9 s
registry: assistant-policy v1 @challenger, not promoted; no champion yet
  - Not promoted: 2 of 8 rules failed (win_rate, malformed_share).
"""
    out = walk.pipeline_summary(printed)
    assert [(s["stage"], s["status"], s["seconds"]) for s in out["stages"]] == [
        ("base model", "ready", 2.1), ("reward model", "ran", 58.0), ("fine-tune (dpo)", "ran", 122.3),
        ("register + promote", "ran", 5.9)]
    assert out["lines"][0].startswith("wall 225.9 s") and out["lines"][-1].startswith("  - Not promoted")
