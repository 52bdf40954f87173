"""`python -m proxy` runs the same command as the `pyproxy` script."""

from proxy.launch import main

raise SystemExit(main())
