"""``config.yaml`` of a model: every key optional, unknown keys and bad values rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ModelConfig, VersionPolicy, load_model_config
from services.errors import ModelLoadError


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    config = load_model_config(tmp_path)
    assert config == ModelConfig()
    assert config.max_batch_size is None
    assert config.dynamic_batching.max_queue_size == 1024


def test_full_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "max_batch_size: 8\n"
        "dynamic_batching: {max_queue_delay_us: 500, preferred_batch_sizes: [4, 8], max_queue_size: 3}\n"
        "instances: 2\n"
        "session: {intra_op_threads: 2, graph_optimization_level: basic}\n"
        "version_policy: {latest: 1}\n"
        "labels: {team: 7}\n"
    )
    config = load_model_config(tmp_path)
    assert config.max_batch_size == 8
    assert config.dynamic_batching.preferred_batch_sizes == (4, 8)
    assert config.instances == 2
    assert config.session.graph_optimization_level == "basic"
    assert config.labels == {"team": "7"}


@pytest.mark.parametrize(("text", "fragments"), [
    ("max_batch_size: -1\n", ["max_batch_size"]),
    ("dynamic_batching: {max_queue_size: 0}\n", ["dynamic_batching.max_queue_size"]),
    ("bogus: 1\n", ["bogus", "Extra inputs"]),
    ("execution_providers: [{name: tpu}]\n", ["execution_providers.0.name"]),
    ("version_policy: {all: true, latest: 2}\n", ["exactly one of all, latest, specific"]),
    ("- 1\n- 2\n", ["expected a mapping", "list"]),
    ("max_batch_size: [\n", ["cannot read"]),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ModelLoadError) as caught:
        load_model_config(tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert str(tmp_path / "config.yaml") in str(caught.value)


@pytest.mark.parametrize(("policy", "expected"), [
    (VersionPolicy(), [1, 2, 5]),
    (VersionPolicy(latest=2), [2, 5]),
    (VersionPolicy(specific=(1, 5, 9)), [1, 5]),
])
def test_version_policy_selects(policy: VersionPolicy, expected: list[int]) -> None:
    assert policy.select([5, 1, 2]) == expected
