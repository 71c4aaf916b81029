"""`python -m services.tide`: one Tide Engine replica, configured from CLISONIX_* environment variables."""

from __future__ import annotations

import asyncio

from services.common.runtime import configure_service_logging
from services.tide.service import TideService
from services.tide.settings import TideSettings


async def main() -> None:
    settings = TideSettings()
    configure_service_logging(settings)
    service = TideService(settings)
    service.runtime.lifecycle.install_signal_handlers()
    await service.start()
    await service.runtime.lifecycle.run_until_stopped()


if __name__ == "__main__":
    asyncio.run(main())
