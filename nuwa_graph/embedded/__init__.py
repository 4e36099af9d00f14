"""The embedded default model: a small LLaVA trained on the shapes world (see docs/embedded.md)."""

from .build import (
                    PROMPT,
                    WEIGHTS_DIR,
                    build_config,
                    build_model,
                    build_processor,
                    build_tokenizer,
                    load_embedded,
                    pixel_values,
                    prompt,
                    save_embedded,
)

__all__ = ["PROMPT", "WEIGHTS_DIR", "build_config", "build_model", "build_processor", "build_tokenizer",
           "load_embedded", "pixel_values", "prompt", "save_embedded"]
