"""The event-loop choice, made in one place: uvloop when importable, else asyncio's own.

``NBDSERVE_LOOP=asyncio`` forces the standard loop (for comparisons and debugging).
"""

from __future__ import annotations

import asyncio
import os


def new_event_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("NBDSERVE_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop
