"""`python -m workers ...`: run one worker (see `--help`); exit 0 after a clean shutdown, 2 on bad flags."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from lb.settings import ConfigError
from workers.config import load_worker_config
from workers.server import serve


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional off Linux/macOS; the default loop works too
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_worker_config(argv)
    except ConfigError as exc:
        print(f"python -m workers: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve(config))
    except ConfigError as exc:
        logging.getLogger("workers").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
