"""Loading a config is quick: it imports none of torch, vLLM, Ray, DeepSpeed, transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "vllm", "ray", "deepspeed", "transformers")
CONFIGS = sorted(str(p) for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_loading_every_shipped_config_imports_no_heavy_library() -> None:
    # A fresh interpreter: this test process has long imported all of them.
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from relay.config import load_config\n"
        f"for path in {CONFIGS!r}:\n"
        "    load_config(Path(path), [])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(CONFIGS) >= 5
    assert json.loads(result.stdout) == []
