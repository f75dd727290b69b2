"""Layout of the attention pictures: the sampling points' legend stands beside the image (it covers
none of the query's points), and the attention map has a colour bar giving its weights."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from detr_lab.visualize.draw import heatmap_figure, sampling_points_figure


def _image(height: int = 60, width: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_sampling_legend_covers_no_point():
    # 4 heads x 3 points, some in the top-right corner, where a legend inside the image would sit.
    points = np.array([[[78, 2], [70, 8], [40, 30]], [[76, 4], [5, 5], [60, 50]],
                       [[79, 1], [30, 40], [10, 55]], [[74, 6], [50, 20], [20, 10]]], dtype=float)
    weights = np.full((4, 3), 0.25)
    figure = sampling_points_figure(_image(), reference=(40, 30), points=points, weights=weights,
                                    box=(10, 10, 70, 50), title="sampling points")
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    image_axes = figure.axes[0]
    (legend,) = figure.legends
    legend_box = legend.get_window_extent(renderer)
    assert [text.get_text() for text in legend.get_texts()] == [*(f"head {h}" for h in range(4)),
                                                                "reference point"]
    assert not legend_box.overlaps(image_axes.get_window_extent(renderer))
    on_screen = image_axes.transData.transform(points.reshape(-1, 2))
    assert not any(legend_box.contains(x, y) for x, y in on_screen)
    assert legend_box.x1 <= figure.bbox.x1 + 0.5  # inside the picture, not cut off


def test_attention_map_has_a_colour_bar_of_its_weights():
    heat = np.linspace(0.01, 0.2, 60 * 80).reshape(60, 80)
    figure = heatmap_figure(_image(), heat, box=None, title="cross-attention")
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    image_axes, bar_axes = figure.axes
    assert bar_axes.get_ylim() == pytest.approx((0.01, 0.2))
    assert bar_axes.get_ylabel() == "attention weight"
    assert not bar_axes.get_window_extent(renderer).overlaps(image_axes.get_window_extent(renderer))
    assert bar_axes.get_window_extent(renderer).x1 <= figure.bbox.x1 + 0.5
