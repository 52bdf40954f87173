"""`python -m proxy` runs the same command line as the `pyproxy` script."""

from proxy.cli import main

raise SystemExit(main())
