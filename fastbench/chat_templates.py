"""Chat templates for tokenizers that have none, written from each model family's published prompt format.

``get_chat_template(tokenizer, "llama-3")`` sets ``tokenizer.chat_template`` (Jinja, as transformers'
``apply_chat_template`` renders it) and returns the tokenizer. Marker strings the tokenizer does not know
as special tokens are tokenized as plain text; no token is added (that would change the vocabulary the
model was trained with).
"""
from __future__ import annotations

# Each template renders {"role", "content"} messages; ``add_generation_prompt`` opens an assistant turn.
TEMPLATES = {
    # Meta Llama 3: header per turn, content trimmed, <|eot_id|> closes every turn.
    "llama-3": (
        "{{- bos_token }}"
        "{%- for m in messages %}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    ),
    # ChatML (Qwen, many fine-tunes): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{%- for m in messages %}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    # Mistral instruct: [INST] user [/INST] answer</s>; a system message is put before the next user turn.
    "mistral": (
        "{{- bos_token }}{%- set ns = namespace(system='') %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{%- set ns.system = m['content'] + '\n\n' %}"
        "{%- elif m['role'] == 'user' %}{{- '[INST] ' + ns.system + m['content'] + ' [/INST]' }}"
        "{%- set ns.system = '' %}"
        "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('the mistral template has no role ' + m['role']) }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    # Gemma: <start_of_turn>user|model ... <end_of_turn>; a system message is put before the next user turn.
    "gemma": (
        "{{- bos_token }}{%- set ns = namespace(system='') %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{%- set ns.system = m['content'] + '\n\n' %}"
        "{%- elif m['role'] == 'user' %}"
        "{{- '<start_of_turn>user\n' + ns.system + m['content'] + '<end_of_turn>\n' }}{%- set ns.system = '' %}"
        "{%- elif m['role'] == 'assistant' %}{{- '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}"
        "{%- else %}{{- raise_exception('the gemma template has no role ' + m['role']) }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
    ),
    # Stanford Alpaca: a preamble, then ### Instruction: / ### Response: sections.
    "alpaca": (
        "{{- bos_token }}"
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n' }}"
        "{%- endif %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'system' %}{{- m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'user' %}{{- '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{%- elif m['role'] == 'assistant' %}{{- '### Response:\n' + m['content'] + eos_token + '\n\n' }}"
        "{%- else %}{{- raise_exception('the alpaca template has no role ' + m['role']) }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
    ),
}
TEMPLATE_NAMES = tuple(TEMPLATES)


def get_chat_template(tokenizer, name: str):
    """Sets the chat template ``name`` (one of TEMPLATE_NAMES) on ``tokenizer`` and returns it."""
    try:
        tokenizer.chat_template = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATE_NAMES)}") from None
    return tokenizer
