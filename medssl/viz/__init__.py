"""Pictures: previews of the data, MAE reconstructions and other task panels."""

from .figure import save_figure
from .panels import write_panels
from .preview import write_previews
from .views import display_2d, orthogonal_views

__all__ = ["save_figure", "write_panels", "write_previews", "display_2d", "orthogonal_views"]
