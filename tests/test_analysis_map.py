"""Specification of the collection's map: a layout fitted on a sample, stored per table version."""

from __future__ import annotations

import numpy as np
import pytest
from tables import append_rows, make_images_table

from cachebind.analysis.layout import compute_map, latest_map_version, read_map
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
