"""Entry script of `ray submit`: run an experiment on a cluster that `ray up` started.

    ray submit deploy/ray/cluster-local.yaml deploy/ray/submit_run.py -- -c configs/cluster.yaml

`ray submit` copies this file to the head's home directory and runs it there with the
head's `python`. The cluster YAMLs sync the project to ~/relay on every node and install
it there, so the script works from that directory (RELAY_HOME overrides it), joins the
running cluster and runs the experiment exactly as `relay run` does: actors go where
`actors.resources` says, and the learner moves to a learning node when
`ray.learner_resources` is set. Arguments are those of `relay run`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    home = Path(os.environ.get("RELAY_HOME", "~/relay")).expanduser()
    if not (home / "relay" / "cli.py").is_file():
        print(f"submit_run.py: no Relay project at {home} (set RELAY_HOME)", file=sys.stderr)
        return 2
    os.chdir(home)
    sys.path.insert(0, str(home))
    from relay.cli import main as relay

    # Overrides come last, so joining the running cluster wins over the config file.
    return relay(["run", *argv, "ray.address=auto"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
