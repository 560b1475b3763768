"""``python -m flows AUDIO [flags]``: the command line (the same as ``whisperx-prefect``), :func:`flows.cli.main`."""
from flows.cli import main

raise SystemExit(main())
