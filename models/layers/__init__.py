"""Layers shared by several model families."""
from jaxattn.models.layers.depthwise import DepthwiseConv2d, depthwise_conv2d, resolve_padding
from jaxattn.models.layers.drop_path import DropPath, drop_path_rates

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "resolve_padding", "DropPath", "drop_path_rates"]
