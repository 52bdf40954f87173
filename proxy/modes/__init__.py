"""The modes a pyproxy process runs in: standalone (one command line, fd 3, fd 4, signals)
and the engine (every registration handed over by spawned pyproxies). Both serve each
command line as a Publication."""
