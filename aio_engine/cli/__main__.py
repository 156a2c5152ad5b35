"""`python -m aio_engine.cli ...` is `aio-engine ...`."""

from . import main

if __name__ == "__main__":  # not when the engine process (spawned) imports this module as its parent's main
    main()
