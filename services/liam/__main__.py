"""`python -m services.liam`: the LIAM analytics service, configured from CLISONIX_* environment variables."""

from __future__ import annotations

import asyncio

from services.common.runtime import configure_service_logging
from services.liam.service import LiamService
from services.liam.settings import LiamSettings


async def main() -> None:
    settings = LiamSettings()
    configure_service_logging(settings)
    service = LiamService(settings)
    service.runtime.lifecycle.install_signal_handlers()
    await service.start()
    await service.runtime.lifecycle.run_until_stopped()


if __name__ == "__main__":
    asyncio.run(main())
