"""Chat templates of the released -hf checkpoints, shared by test_prompts.py and test_lmms.py
(imported as `_chat_templates`, not `tests.`: the lmms extra installs a top-level `tests`
package, latex2sympy2's, which shadows this folder in that environment)."""

# the chat templates of the released -hf checkpoints, as their conversion scripts write them
# (transformers' convert_internvl_weights_to_hf / convert_llava_onevision_weights_to_hf): no system message
INTERNVL_HF_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'video' %}"
    "<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ONEVISION_HF_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'video') %}<video>\n{% endfor %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_HF_TEMPLATES = {"internvl": INTERNVL_HF_TEMPLATE, "llava_onevision": ONEVISION_HF_TEMPLATE}
