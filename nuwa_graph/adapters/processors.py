"""Processors without torchvision: the stock multimodal processors check that a video
processor of the right class is given, and that class lives behind torchvision. Images never
need it, so every family (the Qwen-VL line, LLaVA-NeXT/OneVision, InternVL) builds its
processor through `without_video`."""

from __future__ import annotations

from functools import cache


@cache
def without_video(base: type) -> type:
    """`base` (a transformers processor class) accepting `video_processor=None`; same class name,
    so a saved processor config names the stock class."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(base.__name__, (base,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "__doc__": f"{base.__name__} usable without torchvision (`video_processor=None`; no videos)."})
