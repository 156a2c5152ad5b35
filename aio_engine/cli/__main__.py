"""`python -m aio_engine.cli ...` is `aio-engine ...`."""

from . import main

main()
