"""Tools the model can call. ``zoom`` crops the original or an earlier observation."""

from glimpse.tools.zoom import MIN_BOX_SIDE, ZOOM_MAX_ASPECT_RATIO, ImageState, ZoomResult, ZoomTool

__all__ = ["MIN_BOX_SIDE", "ZOOM_MAX_ASPECT_RATIO", "ImageState", "ZoomResult", "ZoomTool"]
