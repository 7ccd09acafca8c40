"""The buffer benchmark runs end to end (tiny sizes), so it cannot rot unnoticed.

It broke once already when a Lua script gained an argument; figures are not checked
here (tests never check wall-clock time), only that every figure is produced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_buffer_benchmark_writes_every_figure(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "buffer_throughput.py"),
            "--out",
            str(tmp_path),
            "--megabytes",
            "0.2",
            "--repeats",
            "1",
        ],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    report = json.loads((tmp_path / "buffer.json").read_text())
    assert set(report["sizes"]) == {"small", "standard", "large"}
    for figures in report["sizes"].values():
        for name in (
            "ratio_put_vs_raw",
            "ratio_sample_vs_raw",
            "ratio_sample_transport_only_vs_raw",
            "redis_memory_vs_payload",
            "decode_validate_us_per_group",
        ):
            assert figures[name] > 0, name
    assert (tmp_path / "buffer.png").stat().st_size > 0
