"""The processors of the Qwen-VL line without torchvision: the stock processor classes with
`video_processor=None` accepted, and `qwen_processor` for a tokenizer and PIL image processing."""

from __future__ import annotations


def _processor_class(name: str = "Qwen2_5_VLProcessor") -> type:
    """The transformers processor class `name` (Qwen2VLProcessor, Qwen2_5_VLProcessor,
    Qwen3VLProcessor) accepting `video_processor=None` (processors.without_video)."""
    import transformers

    from .processors import without_video

    return without_video(getattr(transformers, name))


def qwen_processor(tokenizer, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                   min_pixels: int | None = None, max_pixels: int | None = None,
                   processor_class: str = "Qwen2_5_VLProcessor"):
    """A Qwen-VL processor (`processor_class`: Qwen2VLProcessor, Qwen2_5_VLProcessor,
    Qwen3VLProcessor) from a tokenizer and PIL image processing (no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    factor = patch_size * merge_size
    kwargs = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    kwargs["min_pixels"] = min_pixels if min_pixels is not None else factor * factor
    kwargs["max_pixels"] = max_pixels if max_pixels is not None else factor * factor * 1280
    image_processor = Qwen2VLImageProcessorPil(**kwargs)
    return _processor_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
