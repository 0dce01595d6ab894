"""Operating a run, below the `npo` command and above the roles: the embedded `train` and `demo` (embedded), the
launcher (`npo up/down/restart`), the Ray backend, the run-state files (state), `npo train --connect` (connect), the
controller's commands (control) and the experiment grid (experiment)."""
