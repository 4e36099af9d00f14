"""Processors without torchvision: the stock multimodal processors check that a video
processor of the right class is given, and that class lives behind torchvision. Images never
need it, so the families build their processors with `video_processor=None` accepted."""

from __future__ import annotations

from functools import cache


@cache
def without_video(base: type) -> type:
    """`base` (a transformers processor class) accepting `video_processor=None`."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"{base.__name__}NoVideo", (base,), {
        "check_argument_for_proper_class": check_argument_for_proper_class,
        "__doc__": f"{base.__name__} usable without torchvision (`video_processor=None`; no videos)."})
