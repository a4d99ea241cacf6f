"""Specification of the collection's map: a layout fitted on a sample, stored per table version."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ray_local import use_local_ray
from tables import append_rows, make_images_table

from cachebind.analysis.layout import (
    latest_map_version,
    load_projection,
    map_metadata,
    read_map,
)
from cachebind.analysis.map_run import compute_map
from cachebind.analysis.notebook import collection_map
from cachebind.config import Settings
from cachebind.store import CacheTable


def settings_for(store, **analysis) -> Settings:
    return Settings(store=store, analysis={"batch_rows": 64, **analysis})


def test_a_pca_map_places_every_row_as_a_numpy_projection_does(tmp_path):
    store = make_images_table(tmp_path / "db", n=300, dim=16, dtype="float32")
    result = compute_map(settings_for(store, map_sample=1000), "pca")
    table = CacheTable.open(store)
    assert result.rows == 300 and result.table_version == table.version
    got = read_map(store, table.version).points.to_pandas().set_index("id")
    ids, vectors = next(table.iter_vectors(1000))
    mean = vectors.mean(0)
    _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    want = (vectors - mean) @ vt[:2].T
    xy = got.loc[ids, ["x", "y"]].to_numpy()
    for axis in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(xy[:, axis] @ want[:, axis])
        np.testing.assert_allclose(xy[:, axis], sign * want[:, axis], atol=1e-4)


def test_a_map_describes_the_table_version_it_was_computed_on(tmp_path):
    store = make_images_table(tmp_path / "db", n=120, dim=16, dtype="float32")
    first = compute_map(settings_for(store), "pca")
    append_rows(store, 40, 16, seed=1, start=120)
    newer = CacheTable.open(store).version
    assert newer > first.table_version
    # The newer version has no map yet: the page keeps showing the one it has.
    assert latest_map_version(store, newer) == first.table_version
    assert read_map(store, first.table_version).points.num_rows == 120
    second = compute_map(settings_for(store), "pca")
    assert second.table_version == newer and latest_map_version(store, newer) == newer
    assert read_map(store, newer).points.num_rows == 160
    assert read_map(store, first.table_version).points.num_rows == 120
    with pytest.raises(FileNotFoundError, match="cachebind map"):
        read_map(store, newer + 5)


@pytest.mark.slow
def test_umap_fitted_on_a_sample_keeps_clusters_together_for_the_rows_it_transforms(tmp_path):
    store = make_images_table(tmp_path / "db", n=400, dim=16, seed=3, dtype="float32")
    result = compute_map(settings_for(store, map_sample=200, map_neighbours=10), "umap")
    assert result.method == "umap" and result.rows == 400 and result.sample == 200
    table = CacheTable.open(store)
    ids, vectors = next(table.iter_vectors(1000))
    xy = read_map(store, table.version).points.to_pandas().set_index("id").loc[ids]
    xy = xy[["x", "y"]].to_numpy()

    # Neighbours in the map are neighbours in the embedding far more often than chance.
    def knn(x: np.ndarray, k: int = 10) -> np.ndarray:
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :k]

    cosine_nn = np.argsort(-(vectors @ vectors.T) + 2 * np.eye(len(vectors)), axis=1)[:, :10]
    map_nn = knn(xy)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(map_nn, cosine_nn, strict=True)])
    assert overlap > 0.3  # chance is 10/399


def test_the_notebook_map_is_a_dataframe_and_a_figure_coloured_by_label(tmp_path):
    from matplotlib.figure import Figure

    store = make_images_table(tmp_path / "db", n=80, dim=16, dtype="float32")
    view = collection_map(settings_for(store, map_method="pca"))
    assert len(view.frame) == 80 and {"id", "x", "y"} <= set(view.frame.columns)
    assert isinstance(view.figure, Figure) and view.method == "pca"


@pytest.fixture(scope="module")
def ray_session():

    use_local_ray(num_cpus=2)


def positions(store, version: int) -> pd.DataFrame:
    return read_map(store, version).points.to_pandas().set_index("id").sort_index()


def test_the_ray_job_finishes_a_stopped_run_with_each_row_once_where_a_local_run_puts_it(
    tmp_path, ray_session
):
    from jobs.map import run_map

    store = make_images_table(tmp_path / "db", n=300, dim=16, dtype="float32")
    settings = settings_for(store, map_partition_rows=50, map_sample=120)
    version = CacheTable.open(store).version
    local = compute_map(settings, "pca")
    assert (local.rows, local.placed) == (300, 300)
    want = positions(store, version)

    stopped = compute_map(settings, "pca", max_partitions=2)
    assert stopped.placed == 100 and stopped.rows == 0
    resumed = run_map(settings, "pca")
    assert (resumed.rows, resumed.placed, resumed.sample) == (300, 200, 120)
    got = positions(store, version)
    assert got.index.is_unique and len(got) == 300
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got[["x", "y"]].to_numpy(), want[["x", "y"]].to_numpy())
    assert run_map(settings, "pca").placed == 300  # a finished map is computed afresh


def test_a_stopped_run_leaves_the_previous_map_served_and_resumes_without_duplicates(tmp_path):
    store = make_images_table(tmp_path / "db", n=130, dim=16, dtype="float32")
    version = CacheTable.open(store).version
    settings = settings_for(store, map_partition_rows=40)
    stopped = compute_map(settings, "pca", max_partitions=1)
    assert stopped.placed == 40
    # Nothing is served until the run finishes: a reader never sees part of a map.
    assert latest_map_version(store, version) is None
    with pytest.raises(FileNotFoundError):
        read_map(store, version)
    again = compute_map(settings, "pca", max_partitions=1)
    assert again.placed == 40  # the next range, not the first one again
    rest = compute_map(settings, "pca")
    assert (rest.rows, rest.placed) == (130, 50)
    got = positions(store, version)
    assert got.index.is_unique and sorted(got.index) == sorted(CacheTable.open(store).ids())


def test_a_query_equal_to_a_row_lands_on_that_rows_pca_position(tmp_path):
    store = make_images_table(tmp_path / "db", n=200, dim=16, dtype="float32")
    compute_map(settings_for(store, map_sample=80, map_partition_rows=64), "pca")
    table = CacheTable.open(store)
    projection = load_projection(store, table.version)
    ids, vectors = next(table.iter_vectors(1000))
    want = positions(store, table.version).loc[ids, ["x", "y"]].to_numpy()
    for i in (0, 77, 199):
        np.testing.assert_allclose(projection.transform(vectors[i : i + 1])[0], want[i], atol=1e-5)


@pytest.mark.slow
def test_a_query_equal_to_a_row_lands_on_that_rows_umap_position(tmp_path):
    store = make_images_table(tmp_path / "db", n=300, dim=16, seed=3, dtype="float32")
    settings = settings_for(store, map_sample=150, map_neighbours=10, map_partition_rows=100)
    compute_map(settings, "umap")
    table = CacheTable.open(store)
    projection = load_projection(store, table.version)
    assert projection.method == "umap"
    ids, vectors = next(table.iter_vectors(1000))
    want = positions(store, table.version).loc[ids, ["x", "y"]].to_numpy()
    placed = projection.transform(vectors)
    # umap-learn 0.5 transforms each point independently of the others in its batch (the
    # measured error is 0); the tolerance, 0.1 % of the map's extent, allows float rounding.
    extent = np.linalg.norm(want.max(0) - want.min(0))
    error = np.linalg.norm(placed - want, axis=1)
    assert error.max() < 1e-3 * extent, (error.max(), extent)
    alone = np.array([projection.transform(vectors[i : i + 1])[0] for i in (0, 150, 299)])
    assert np.linalg.norm(alone - want[[0, 150, 299]], axis=1).max() < 1e-3 * extent


def test_the_command_computes_the_map_locally_or_as_a_ray_job_and_prints_what_it_placed(
    tmp_path, monkeypatch, capsys, ray_session
):
    from cachebind.cli import main

    monkeypatch.setenv("CACHEBIND_HOME", str(tmp_path / "home"))
    store = make_images_table(tmp_path / "db", n=90, dim=16, dtype="float32")
    version = CacheTable.open(store).version
    argv = ["map", "--table-uri", store.uri, "--method", "pca", "--sample", "40", "--json"]
    assert main(argv) == 0
    local = json.loads(capsys.readouterr().out)
    assert (local["rows"], local["placed"], local["sample"]) == (90, 90, 40)
    want = positions(store, version)
    assert main([*argv, "--ray"]) == 0
    assert json.loads(capsys.readouterr().out)["placed"] == 90
    pd.testing.assert_frame_equal(positions(store, version), want)
    assert main(["map", "--table-uri", store.uri, "--method", "pca"]) == 0
    assert "images_map_v" in capsys.readouterr().out


@pytest.mark.slow
def test_a_umap_map_placed_by_ray_tasks_equals_the_local_one(tmp_path, ray_session):
    from jobs.map import run_map

    store = make_images_table(tmp_path / "db", n=240, dim=16, seed=5, dtype="float32")
    settings = settings_for(store, map_sample=120, map_neighbours=10, map_partition_rows=80)
    version = CacheTable.open(store).version
    compute_map(settings, "umap")
    want = positions(store, version)
    # Stop after the first range, so that the Ray tasks place the other two.
    compute_map(settings, "umap", max_partitions=1)
    assert run_map(settings, "umap").placed == 160
    got = positions(store, version)
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got[["x", "y"]].to_numpy(), want[["x", "y"]].to_numpy())


def test_a_run_with_another_range_size_does_not_mix_its_ranges_with_a_stopped_ones(tmp_path):
    from cachebind.analysis.labelling import table_names
    from cachebind.store import connect

    store = make_images_table(tmp_path / "db", n=100, dim=16, dtype="float32")
    version = CacheTable.open(store).version
    compute_map(settings_for(store, map_partition_rows=30), "pca", max_partitions=2)
    done = compute_map(settings_for(store, map_partition_rows=40), "pca")
    assert (done.rows, done.placed) == (100, 100)
    got = positions(store, version)
    assert got.index.is_unique and sorted(got.index) == sorted(CacheTable.open(store).ids())
    # The finished map supersedes the stopped run: only the map and its model remain.
    left = [n for n in table_names(connect(store)) if n.startswith(f"images_map_v{version}")]
    assert sorted(left) == sorted([f"images_map_v{version}", map_metadata(store, version)["model"]])
