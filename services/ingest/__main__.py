"""`python -m services.ingest`: the ingest service, configured from CLISONIX_* environment variables."""

from __future__ import annotations

import asyncio

from services.common.runtime import configure_service_logging
from services.ingest.service import IngestService
from services.ingest.settings import IngestSettings


async def main() -> None:
    settings = IngestSettings()  # required values come from the environment; missing ones fail here
    configure_service_logging(settings)
    service = IngestService(settings)
    service.runtime.lifecycle.install_signal_handlers()
    await service.start()
    await service.runtime.lifecycle.run_until_stopped()


if __name__ == "__main__":
    asyncio.run(main())
