"""Processors without torchvision: the stock multimodal processors check that a video
processor of the right class is given, and that class lives behind torchvision. Images never
need it, so every family (the Qwen-VL line, LLaVA-NeXT/OneVision, InternVL) builds its
processor through `without_video`. `checkpoint_chat_template`: the processor's own chat template
for a processor built from its parts."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def without_video(base: type[Any]) -> type:
    """`base` (a transformers processor class) accepting `video_processor=None`; same class name,
    so a saved processor config names the stock class."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    from transformers import ProcessorMixin

    stock = base.apply_chat_template

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's own apply_chat_template reads the video processor's frame defaults on every call;
        # with no video processor there are no videos: the generic rendering is the same text
        if getattr(self, "video_processor", None) is None:
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)
        return stock(self, conversation, chat_template, **kwargs)

    members = {"check_argument_for_proper_class": check_argument_for_proper_class,
               "__doc__": f"{base.__name__} usable without torchvision (`video_processor=None`; no videos)."}
    if stock is not ProcessorMixin.apply_chat_template:
        members["apply_chat_template"] = apply_chat_template
    return type(base.__name__, (base,), members)


def checkpoint_chat_template(id_or_path: str, tokenizer) -> str | None:
    """The chat template `AutoProcessor.from_pretrained` would give the checkpoint's processor
    (chat_template.jinja, or the legacy processor-only chat_template.json), else the
    tokenizer's. A processor built by hand from its parts would otherwise take the tokenizer's
    template, which can differ from the processor's (a checkpoint converted from a text LLM keeps
    that LLM's template in tokenizer_config.json), while lmms-eval's chat models render the
    processor's."""
    from transformers import ProcessorMixin

    try:
        found = ProcessorMixin.get_processor_dict(id_or_path)[0].get("chat_template")
    except (OSError, ValueError):  # no processor files: the tokenizer's template is all there is
        found = None
    if isinstance(found, dict):  # several named templates: the default one, as apply_chat_template picks
        found = found.get("default")
    return found or getattr(tokenizer, "chat_template", None)
