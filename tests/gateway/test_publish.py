"""Publication into the watched directory (gateway/publish.py): secrets are readable by their owner only."""

from __future__ import annotations

import stat
from pathlib import Path

from gateway.publish import DATA_LINK, Publisher


def test_secret_files_are_private_and_the_rest_readable(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path / "xds")
    data = publisher.publish({"lds.yaml": b"a: 1\n", "sds-sluice_listener_cert.yaml": b"key: x\n"},
                             private={"sds-sluice_listener_cert.yaml"})
    assert stat.S_IMODE((data / "sds-sluice_listener_cert.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "lds.yaml").stat().st_mode) & 0o044 == 0o044
    assert (tmp_path / "xds" / "sds-sluice_listener_cert.yaml").read_bytes() == b"key: x\n"
    assert (tmp_path / "xds" / DATA_LINK).resolve() == data.resolve()
