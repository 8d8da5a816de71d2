"""``config.yaml`` of a model: every key optional, unknown keys and bad values rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.config import (
    CONFIG_MAX_BYTES,
    LABEL_KEY_MAX,
    LABEL_VALUE_MAX,
    LABELS_MAX,
    ModelConfig,
    VersionPolicy,
    load_model_config,
)
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
    # Named relative to the repository: reasons reach clients, absolute server paths must not.
    assert f"{tmp_path.name}/config.yaml" in str(caught.value)
    assert str(tmp_path.parent) not in str(caught.value)


def alias_bomb(depth: int = 7) -> str:
    """Each level is a list of nine aliases of the one before: 9**depth strings from ~300 bytes."""
    lines = ["labels:", '  a0: &a0 ["xxxxxxxx"]']
    for level in range(1, depth + 1):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"  a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 400
    (tmp_path / "config.yaml").write_text(bomb)
    with pytest.raises(ModelLoadError) as caught:
        load_model_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path.name}/config.yaml: ")
    assert "anchors and aliases" in message and "line 2" in message
    assert len(message) < 500


def test_oversized_config_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("labels:\n" + "".join(f"  k{i}: {'v' * 100}\n" for i in range(3000)))
    with pytest.raises(ModelLoadError, match=f"larger than {CONFIG_MAX_BYTES} bytes"):
        load_model_config(tmp_path)


@pytest.mark.parametrize(("labels", "fragment"), [
    ({f"k{i}": "v" for i in range(LABELS_MAX + 1)}, f"at most {LABELS_MAX} labels"),
    ({"k" * (LABEL_KEY_MAX + 1): "v"}, f"label key of {LABEL_KEY_MAX + 1} characters"),
    ({"": "v"}, "label key of 0 characters"),
    ({"note": "v" * (LABEL_VALUE_MAX + 1)}, f"label 'note': value of {LABEL_VALUE_MAX + 1} characters"),
])
def test_label_sizes_are_bounded(tmp_path: Path, labels: dict[str, str], fragment: str) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"labels": labels}))
    with pytest.raises(ModelLoadError) as caught:
        load_model_config(tmp_path)
    assert fragment in str(caught.value)
    assert len(str(caught.value)) < 1000


def test_labels_at_the_limits_are_accepted(tmp_path: Path) -> None:
    labels = {f"k{i:0{LABEL_KEY_MAX - 1}d}": "v" * LABEL_VALUE_MAX for i in range(LABELS_MAX)}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"labels": labels}, width=1 << 20))
    assert load_model_config(tmp_path).labels == labels


def test_config_symlink_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text("secret_key: 1\n")
    model_dir = tmp_path / "repo" / "m"
    model_dir.mkdir(parents=True)
    (model_dir / "config.yaml").symlink_to(outside)
    with pytest.raises(ModelLoadError) as caught:
        load_model_config(model_dir)
    assert "m/config.yaml: resolves outside the model repository" in str(caught.value)
    assert "secret_key" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    # A link that stays inside the repository is fine.
    (tmp_path / "repo" / "shared.yaml").write_text("max_batch_size: 4\n")
    (model_dir / "config.yaml").unlink()
    (model_dir / "config.yaml").symlink_to(tmp_path / "repo" / "shared.yaml")
    assert load_model_config(model_dir).max_batch_size == 4


@pytest.mark.parametrize(("policy", "expected"), [
    (VersionPolicy(), [1, 2, 5]),
    (VersionPolicy(latest=2), [2, 5]),
    (VersionPolicy(specific=(1, 5, 9)), [1, 5]),
])
def test_version_policy_selects(policy: VersionPolicy, expected: list[int]) -> None:
    assert policy.select([5, 1, 2]) == expected


def test_config_nested_too_deeply_is_a_load_error_of_its_model(tmp_path: Path) -> None:
    """PyYAML builds nested nodes recursively: a small file of brackets raised RecursionError, which
    escaped every handler (and stopped the service's start)."""
    model_dir = tmp_path / "deep"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text("labels: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ModelLoadError, match=r"deep/config.yaml: cannot read: nested too deeply"):
        load_model_config(model_dir)
