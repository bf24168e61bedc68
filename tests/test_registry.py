"""The model registry: hashes verified, aliases atomic, full history, exact rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resources.registry import ModelIntegrityError, ModelRegistryResource, RegistryError

MODEL = "tree\nversion=v4\nnum_class=1\n"  # content is opaque to the registry


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistryResource:
    return ModelRegistryResource(root=str(tmp_path / "registry"))


def _register(registry: ModelRegistryResource, text: str = MODEL) -> str:
    return registry.register(text, '{"format_version": 1}', {"params": {"seed": 1}})["version"]


def test_versions_are_sequential_and_manifests_complete(registry: ModelRegistryResource) -> None:
    first, second = _register(registry), _register(registry, MODEL + "x")
    assert (first, second) == ("m0001", "m0002")
    manifest = registry.manifest(first)
    assert {"version", "sha256", "preprocessor_sha256", "created_at", "params"} <= set(manifest)
    loaded = registry.load(first)
    assert loaded.model_text == MODEL and loaded.sha256 == manifest["sha256"]
    assert registry.versions() == ["m0001", "m0002"]


def test_a_corrupted_model_is_refused_and_the_alias_does_not_move(
    registry: ModelRegistryResource,
) -> None:
    good, bad = _register(registry), _register(registry, MODEL + "bad")
    registry.promote(good, "first")
    model_file = Path(registry.root) / "models" / bad / "model.txt"
    model_file.write_text(model_file.read_text().replace("version=v4", "version=v5"))
    with pytest.raises(ModelIntegrityError, match=r"m0002: model.txt has sha256 .*refusing"):
        registry.load(bad)
    with pytest.raises(ModelIntegrityError):
        registry.promote(bad, "should not happen")
    assert registry.aliases() == {"champion": good, "previous_champion": None}
    assert [d["action"] for d in registry.decisions()] == ["promote"]


def test_a_tampered_preprocessor_is_refused(registry: ModelRegistryResource) -> None:
    version = _register(registry)
    (Path(registry.root) / "models" / version / "preprocessor.json").write_text("{}")
    with pytest.raises(ModelIntegrityError, match=r"preprocessor\.json"):
        registry.load(version)


def test_rollback_restores_the_exact_previous_champion(registry: ModelRegistryResource) -> None:
    v1, v2, v3 = (_register(registry, MODEL + str(i)) for i in range(3))
    for v in (v1, v2, v3):
        registry.promote(v, f"promote {v}")
    assert registry.aliases() == {"champion": v3, "previous_champion": v2}
    entry = registry.rollback("bad release")
    assert entry["version"] == v2 and entry["previous"] == v3
    assert registry.aliases() == {"champion": v2, "previous_champion": v1}
    assert registry.load(registry.champion()).model_text == MODEL + "1"
    registry.rollback()
    assert registry.aliases() == {"champion": v1, "previous_champion": None}
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    assert registry.versions() == [v1, v2, v3]  # history is never deleted
    actions = [(d["action"], d["version"]) for d in registry.decisions()]
    assert actions[-2:] == [("rollback", v2), ("rollback", v1)]


def test_aliases_file_is_replaced_whole(registry: ModelRegistryResource) -> None:
    v1, v2 = _register(registry), _register(registry, MODEL + "2")
    registry.promote(v1, "a")
    registry.promote(v2, "b")
    data = json.loads((Path(registry.root) / "aliases.json").read_text())
    assert (data["champion"], data["previous_champion"], data["stack"]) == (v2, v1, [v1, v2])
    assert not list(Path(registry.root).glob("*.tmp")) and not list(
        Path(registry.root).glob(".aliases.json.*")
    )


def test_promoting_the_champion_again_changes_nothing(registry: ModelRegistryResource) -> None:
    v1 = _register(registry)
    registry.promote(v1, "first")
    registry.promote(v1, "again")
    assert registry.aliases() == {"champion": v1, "previous_champion": None}


def test_unknown_versions_are_clear_errors(registry: ModelRegistryResource) -> None:
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.load("m0042")
    with pytest.raises(RegistryError, match="not a model version"):
        registry.load("../../etc/passwd")
