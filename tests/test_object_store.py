"""The registry and the warehouse on an object store: a configuration change (a URL root).

The object store is moto's S3 server on 127.0.0.1 (``ThreadedMotoServer``), standing in for a
remote S3 we cannot run here; the project's real code path (universal-pathlib -> fsspec ->
s3fs -> HTTP) runs against it, and what it stored is checked with an independent S3 client
(boto3). ``memory://`` exercises the same code without a server.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from moto.server import ThreadedMotoServer
from realdata import valid_table

from mlops_assets.definitions import defs
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import BOOKING_COLUMNS, LABEL, build_features
from mlops_assets.serve.assets import serve_config
from mlops_assets.serve.ray_runtime import free_port
from mlops_assets.train.model import Matrix, fit
from resources import default_resources
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from resources.registry import ModelIntegrityError, ModelRegistryResource, RegistryError
from resources.storage import is_url, storage_path
from resources.warehouse import WarehouseIOManager, WarehouseResource

BUCKET = "mlops-test"
PREPROCESSOR = '{"categories": {}}'


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """An S3-compatible server on 127.0.0.1 with one bucket; returns a boto3 client for it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        # Credentials and endpoint only from the environment, as in production.
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        try:
            yield client
        finally:
            server.stop()


def _keys(client: Any, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(client: Any, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def model_texts() -> list[str]:
    """Two real LightGBM models, as text."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    y = (x[:, 0] + rng.normal(size=500) > 0).astype(float)
    texts = []
    for leaves in (4, 8):
        params = {"objective": "binary", "num_leaves": leaves, "verbosity": -1, "seed": 1}
        texts.append(lgb.train(params, lgb.Dataset(x, label=y), 5).model_to_string())
    return texts


# -- locations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "remote"),
    [("/srv/mlops", False), ("relative/dir", False), ("file:///srv/mlops", False),
     ("s3://bucket/prefix", True), ("memory://reg", True), ("gs://b/p", True)],
)  # fmt: skip
def test_plain_paths_stay_pathlib_and_urls_go_through_fsspec(location: str, remote: bool) -> None:
    assert is_url(location) is remote
    if remote and location.startswith("gs://"):
        return  # gcsfs is not installed; classification is what matters here
    path = storage_path(location)
    assert isinstance(path, Path) is not remote
    if location.startswith("file://"):
        assert path == Path("/srv/mlops")


def test_default_resources_put_warehouse_and_registry_under_mlops_storage_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLOPS_STORAGE_URL", raising=False)
    local = default_resources()
    assert local["warehouse"].root == str(tmp_path / "home" / "warehouse")
    assert local["registry"].root == str(tmp_path / "home" / "registry")
    monkeypatch.setenv("MLOPS_STORAGE_URL", "s3://bucket/team/")
    remote = default_resources()
    assert remote["warehouse"].root == "s3://bucket/team/warehouse"
    assert remote["registry"].root == "s3://bucket/team/registry"
    assert remote["warehouse"].reports_root == str(tmp_path / "home" / "reports")  # stays local


# -- the registry on S3 -----------------------------------------------------------------------


def test_registry_on_s3_stores_verifies_and_moves_aliases(s3: Any, model_texts: list[str]) -> None:
    registry = ModelRegistryResource(root=f"s3://{BUCKET}/reg/registry")
    assert registry.on_object_store and registry.versions() == [] and registry.champion() is None
    first = registry.register(model_texts[0], PREPROCESSOR, {"metrics": {"valid_auc": 0.7}})
    second = registry.register(model_texts[1], PREPROCESSOR, {"metrics": {"valid_auc": 0.8}})
    assert (first["version"], second["version"]) == ("m0001", "m0002")
    assert registry.versions() == ["m0001", "m0002"]
    # What is in the bucket, read by another S3 client: the text model, byte for byte.
    stored = _get(s3, "reg/registry/models/m0001/model.txt")
    assert stored == model_texts[0].encode()
    assert hashlib.sha256(stored).hexdigest() == first["sha256"]
    loaded = registry.load("m0001")  # hash-verified read through s3fs
    assert loaded.model_text == model_texts[0] and loaded.sha256 == first["sha256"]
    assert lgb.Booster(model_str=loaded.model_text).num_trees() == 5

    registry.promote("m0001", "first")
    registry.promote("m0002", "better")
    assert registry.aliases() == {"champion": "m0002", "previous_champion": "m0001"}
    registry.rollback("test rollback")
    assert registry.champion() == "m0001"
    assert [d["action"] for d in registry.decisions()] == ["promote", "promote", "rollback"]
    keys = _keys(s3, "reg/registry/")
    assert "reg/registry/aliases.json" in keys
    assert sum(k.startswith("reg/registry/decisions/") for k in keys) == 3
    # No lock file, no temporary objects: every object is written once, whole.
    assert not [k for k in keys if k.endswith((".tmp", ".lock"))]
    # A second resource (another process, say) sees the same state.
    again = ModelRegistryResource(root=f"s3://{BUCKET}/reg/registry")
    assert again.versions() == ["m0001", "m0002"] and again.champion() == "m0001"


def test_a_tampered_model_on_s3_is_refused_and_the_alias_stays(
    s3: Any, model_texts: list[str]
) -> None:
    registry = ModelRegistryResource(root=f"s3://{BUCKET}/tamper/registry")
    good = registry.register(model_texts[0], PREPROCESSOR, {})["version"]
    bad = registry.register(model_texts[1], PREPROCESSOR, {})["version"]
    registry.promote(good, "first")
    key = f"tamper/registry/models/{bad}/model.txt"
    s3.put_object(
        Bucket=BUCKET, Key=key, Body=_get(s3, key).replace(b"num_leaves=8", b"num_leaves=9")
    )
    with pytest.raises(ModelIntegrityError, match=rf"model {bad}: model.txt has sha256"):
        registry.load(bad)
    with pytest.raises(ModelIntegrityError):
        registry.promote(bad, "must not move")
    assert registry.champion() == good
    with pytest.raises(RegistryError, match="m0099 is not in the registry"):
        registry.manifest("m0099")


def test_registry_on_memory_fs(model_texts: list[str]) -> None:
    registry = ModelRegistryResource(root="memory://mlops-test-registry/registry")
    version = registry.register(model_texts[0], PREPROCESSOR, {})["version"]
    registry.promote(version, "memory")
    assert registry.load(version).model_text == model_texts[0]
    assert registry.champion() == version and len(registry.decisions()) == 1


# -- the warehouse on S3 ----------------------------------------------------------------------


def test_warehouse_partitions_on_s3_round_trip(s3: Any, tmp_path: Path) -> None:
    weather = valid_table("weather")
    months = {m: weather.filter(pl.col("month") == m) for m in (1, 2)}
    warehouse = WarehouseResource(
        root=f"s3://{BUCKET}/wh/warehouse", reports_root=str(tmp_path / "reports")
    )
    for m, frame in months.items():
        path = warehouse.write("weather", frame, f"2013-0{m}")
        assert str(path) == f"s3://{BUCKET}/wh/warehouse/weather/2013-0{m}.parquet"
    assert warehouse.partitions("weather") == ["2013-01", "2013-02"]
    assert warehouse.partitions("nothing") == []
    assert warehouse.read("weather", ["2013-02"]).equals(months[2])
    assert warehouse.read("weather").equals(pl.concat([months[1], months[2]]))
    # The object is plain Parquet for any other reader of the bucket.
    raw = _get(s3, "wh/warehouse/weather/2013-01.parquet")
    assert pl.read_parquet(io.BytesIO(raw)).equals(months[1])
    with pytest.raises(FileNotFoundError, match=r"no partition\(s\) \['2013-03'\]"):
        warehouse.read("weather", ["2013-03"])
    with pytest.raises(FileNotFoundError, match="no stored partitions"):
        warehouse.read("nothing")
    # Overwriting a partition replaces the object whole.
    warehouse.write("weather", months[2], "2013-01")
    assert warehouse.read("weather", ["2013-01"]).equals(months[2])
    con = warehouse.connect()
    (rows,) = con.execute("SELECT count(*) FROM weather").fetchone()
    assert rows == 2 * months[2].height


def test_pipeline_assets_write_their_tables_to_s3(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference tables materialized by Dagster with MLOPS_STORAGE_URL set land in the bucket."""
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLOPS_STORAGE_URL", f"s3://{BUCKET}/pipe")
    for name in ("MLOPS_REFERENCE_DB_URL", "MLOPS_WEATHER_API_URL", "MLOPS_WEATHER_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    resources = default_resources()
    assert isinstance(resources["io_manager"], WarehouseIOManager)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = dg.materialize(
            list(defs.assets),
            selection=["raw_planes", "planes", "raw_airlines", "airlines"],
            resources=resources,
            instance=instance,
        )
    assert result.success
    keys = _keys(s3, "pipe/warehouse/")
    assert {f"pipe/warehouse/{t}/all.parquet" for t in ("planes", "airlines")} <= set(keys)
    planes = pl.read_parquet(io.BytesIO(_get(s3, "pipe/warehouse/planes/all.parquet")))
    assert planes.height > 3000 and resources["warehouse"].read("planes").equals(planes)
    assert not (tmp_path / "home" / "warehouse").exists()  # nothing went to the local disk


def test_the_serving_loader_reads_model_and_reference_tables_from_s3(
    s3: Any, tmp_path: Path
) -> None:
    """What a Serve replica runs to load a model, with registry and warehouse on S3."""
    from mlops_assets.serve.deployment import ModelTarget, load_predictor

    flights = valid_table("flights", 1)
    weather, planes = valid_table("weather"), valid_table("planes")
    registry = ModelRegistryResource(root=f"s3://{BUCKET}/serve/registry")
    warehouse = WarehouseResource(
        root=f"s3://{BUCKET}/serve/warehouse", reports_root=str(tmp_path / "reports")
    )
    warehouse.write("weather", weather, "2013-01")
    warehouse.write("planes", planes)
    labelled = build_features(flights, weather, planes).filter(pl.col(LABEL).is_not_null())
    preprocessor = Preprocessor.fit(labelled)
    booster = fit({"num_leaves": 7}, Matrix.from_features(labelled, preprocessor), 10,
                  seed=1, num_threads=1)  # fmt: skip
    version = registry.register(booster.model_to_string(), preprocessor.to_json(), {})["version"]
    # The roots the served_model asset hands to the replicas stay URLs.
    config = serve_config(
        registry, warehouse, RayResource(state_dir=str(tmp_path / "ray")),
        PredictionLogResource(folder=str(tmp_path / "log")),
    )  # fmt: skip
    assert (config.registry_root, config.warehouse_root) == (registry.root, warehouse.root)
    predictor = load_predictor(
        ModelTarget(
            model_version=version,
            registry_root=config.registry_root,
            warehouse_root=config.warehouse_root,
        ),
        num_threads=1,
    )  # fmt: skip  (load_predictor runs the smoke prediction)
    assert predictor.version == version
    records = flights.select(list(BOOKING_COLUMNS)).head(5).to_dicts()
    expected = booster.predict(
        Matrix.from_features(build_features(flights.head(5), weather, planes), preprocessor).x
    )
    scored = [p.delay_probability for p in predictor.predict(records)]
    assert np.allclose(scored, expected)
