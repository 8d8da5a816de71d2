import asyncio, sys
import pytest
from tests.mesh.test_registrar import test_outage_then_restart_restores_registrations_without_stale_entries as t

async def dump_later():
    await asyncio.sleep(35)
    for task in asyncio.all_tasks():
        print("TASK", task.get_name(), file=sys.stderr); task.print_stack(limit=40, file=sys.stderr)
    sys.stderr.flush()

async def test_debug(etcd):
    d = asyncio.create_task(dump_later())
    await t(etcd, 5.0)
    d.cancel()
