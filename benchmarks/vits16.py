"""The benchmarks' model: a ViT-S/16 with DINO's shape and random weights, so they run offline.

Same compute as facebook/dino-vits16 at 224 px (384 dims, 12 layers, 6 heads, 196 patches).
"""
from pathlib import Path


def save_vits16(folder: Path, layers: int = 12) -> Path:
    """The model saved to `folder`; fewer `layers` keep the shape of each and the work around the model."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6,
                       intermediate_size=1536, image_size=224, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder
