"""Backbones: the 2D/3D ViT, the Medformer (Perceiver IO over 2D and 3D), position embeddings, windows, pooling and export to MONAI."""

from .base import Encoder, GridEncoder, embed, encode
from .blocks import Attention, Block, CrossAttention, CrossBlock, key_padding_mask
from .feature_map import MedformerFeatureMap, ViTFeatureMap
from .medformer import DEFAULT_COLLECTIONS, Medformer, MedformerView
from .export import monai_vit_state_dict, to_monai_vit
from .pooling import POOLINGS, pool_tokens
from .position import sincos_position_embedding
from .vit import SIZES, ViT
from .windows import WindowLayout

__all__ = ["Encoder", "GridEncoder", "encode", "embed", "ViT", "ViTFeatureMap", "SIZES", "Attention", "Block", "CrossAttention", "CrossBlock", "key_padding_mask", "WindowLayout", "sincos_position_embedding", "POOLINGS", "pool_tokens",
           "monai_vit_state_dict", "to_monai_vit", "Medformer", "MedformerView", "MedformerFeatureMap", "DEFAULT_COLLECTIONS"]
