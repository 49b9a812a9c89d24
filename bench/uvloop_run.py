#!/usr/bin/env python3
"""Run a Python script on uvloop's event loop: `uvloop_run.py SCRIPT ARGS...` installs
uvloop's event loop policy, then runs SCRIPT as __main__ with ARGS, so that its
asyncio.run() loop is uvloop's. bench/transport.py --uvloop measures servers this way."""

from __future__ import annotations

import runpy
import sys

import uvloop

if __name__ == "__main__":
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    uvloop.install()
    runpy.run_path(script, run_name="__main__")
