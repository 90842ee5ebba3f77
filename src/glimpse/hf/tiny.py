"""Tiny randomly initialised Qwen-VL checkpoints, built locally in seconds, for tests and CPU experiments.

No weights can be downloaded here, so everything that loads or trains real Qwen-VL checkpoints is tested on
models of the same architecture built from a config: a byte-level BPE tokenizer trained on Glimpse's own
prompt vocabulary, Qwen's special tokens in Qwen's order, a ChatML chat template with vision tokens, the
transformers image processor, and random weights. The folder has the layout of a real checkpoint, so
``HFBackend``, ``glimpse serve`` and SFT load it exactly as they load Qwen2.5-VL-7B.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from glimpse.hf.processor import image_only_class, quiet_progress

# Qwen's special tokens, in Qwen's order (appended after the learned vocabulary, as in real checkpoints).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Protocol tags as single tokens: easier for a small model; real Qwen checkpoints split them into pieces.
PROTOCOL_TOKENS = [
    "<think>",
    "</think>",
    "<grounding>",
    "</grounding>",
    "<answer>",
    "</answer>",
    "<python>",
    "</python>",
    "<tool_call>",
    "</tool_call>",
]

# ChatML with vision placeholders: each message is <|im_start|>role\n…<|im_end|>\n; an image part becomes
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to one per image token); tool
# results are user turns wrapped in <tool_response>; tool calls follow the assistant text as <tool_call> JSON.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] }}"
    "{{ '\\n\\n' }}"
    "{%- endif -%}"
    '{{ \'You may call these functions; write each call as <tool_call>{\\"name\\": ..., \\"arguments\\": ...}\''
    " + '</tool_call>:\\n<tools>\\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\\n' }}{%- endfor -%}"
    "{{ '</tools><|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{%- set role = 'user' if message['role'] == 'tool' else message['role'] -%}"
    "{{ '<|im_start|>' + role + '\\n' }}"
    "{%- if message['role'] == 'tool' -%}{{ '<tool_response>\\n' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{ '<tool_call>{\\\"name\\\": \\\"' + call['function']['name'] + '\\\", \\\"arguments\\\": ' }}"
    "{{ call['function']['arguments'] if call['function']['arguments'] is string "
    "else call['function']['arguments'] | tojson }}{{ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'tool' -%}{{ '\\n</tool_response>' }}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

SIZES: dict[str, dict[str, Any]] = {
    # text: hidden, layers, heads, kv heads, MLP; vision: hidden, depth, heads, MLP
    "tiny": {
        "hidden": 128,
        "layers": 2,
        "heads": 4,
        "kv": 2,
        "mlp": 256,
        "v_hidden": 64,
        "v_depth": 2,
        "v_heads": 2,
        "v_mlp": 128,
    },
    "small": {
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "kv": 2,
        "mlp": 768,
        "v_hidden": 128,
        "v_depth": 4,
        "v_heads": 4,
        "v_mlp": 512,
    },
}


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Text in Glimpse's own vocabulary (prompts, calls, answers, numbers) to train a tokenizer on."""
    from glimpse.protocol.prompts import DEFAULT_PROMPTS

    rng = random.Random(seed)
    words = (
        "the sign code border star corner marker colour shape dot dots left right zoom into region image "
        "observation original answer number small large top bottom red green blue orange purple black "
        "circle square triangle diamond cross hexagon read see cannot yes no it is a of on in with"
    ).split()
    out = [p.system + p.code for p in DEFAULT_PROMPTS.values()]
    out += [p.observation + p.error for p in DEFAULT_PROMPTS.values()]
    for _ in range(lines):
        box = [round(rng.random(), rng.choice((2, 3))) for _ in range(4)]
        out.append(
            f"<think>{' '.join(rng.choice(words) for _ in range(rng.randint(4, 14)))}.</think>"
            f'<grounding>{{"bbox_2d": {json.dumps(box)}, "source": "observation_{rng.randint(1, 9)}"}}</grounding>'
        )
        out.append(
            f"<answer>{''.join(rng.choice('ACEFHJKLMNPRTUVWXY34679') for _ in range(4))}</answer> "
            f"{rng.randint(0, 1000)} {rng.choice(words).capitalize()}?"
        )
    return out


def drop_merges(data: dict[str, Any], apart: str) -> dict[str, Any]:
    """A tokenizer's JSON (``tokenizer.json``) without the BPE merges whose result fully matches the regular
    expression ``apart``: text such merges would join is then written in smaller tokens. The vocabulary and its
    ids stay as they are (the merged tokens remain, never produced), so a model trained on it still loads."""
    import re

    pattern = re.compile(apart)
    merges = data["model"]["merges"]
    joined = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges]
    data["model"]["merges"] = [m for m, text in zip(merges, joined, strict=True) if not pattern.fullmatch(text)]
    return data


def build_tokenizer(
    vocab_size: int = 4000,
    seed: int = 0,
    *,
    texts: list[str] | None = None,
    extra_tokens: tuple[str, ...] = (),
    apart: str | None = None,
) -> Any:
    """A byte-level BPE tokenizer wrapped as Qwen's tokenizer class, with the chat template.

    ``texts`` replaces the default training corpus; ``extra_tokens`` are added as whole (non-special) tokens
    after the protocol tags; ``apart``: a regular expression of what no token may hold (``drop_merges``; the
    built-in model writes a code's characters one token each).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts if texts is not None else corpus(seed), trainer=trainer)
    if apart is not None:
        tok = Tokenizer.from_str(json.dumps(drop_merges(json.loads(tok.to_str()), apart)))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([*PROTOCOL_TOKENS, *extra_tokens])
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


FAMILY_NAMES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


def build_tiny_qwen(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "qwen2_5_vl",
    size: str = "tiny",
    vocab_size: int = 4000,
    seed: int = 0,
    min_pixels: int = 40_000,
    max_pixels: int = 2_000_000,
) -> Path:
    """Write a random Qwen2.5-VL, Qwen2-VL or Qwen3-VL checkpoint (a real one's layout) to ``out_dir``.

    Raises:
        ValueError: an unknown family or size.
    """
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in FAMILY_NAMES:
        raise ValueError(f"family must be one of {', '.join(FAMILY_NAMES)}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    spec = SIZES[size]
    tokenizer = build_tokenizer(vocab_size, seed)
    qwen3 = family == "qwen3_vl"
    patch = 16 if qwen3 else 14
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5] if qwen3 else [0.48145466, 0.4578275, 0.40821073],
        image_std=[0.5, 0.5, 0.5] if qwen3 else [0.26862954, 0.26130258, 0.27577711],
    )
    config = _config(family, spec, tokenizer, patch)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    out = Path(out_dir)
    quiet_progress()
    model.save_pretrained(out)
    processor_class = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}.get(
        family, "Qwen3VLProcessor"
    )
    processor = image_only_class(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    return out


def _config(family: str, spec: dict[str, Any], tokenizer: Any, patch: int) -> Any:
    """The model config of a family at a size, with the tokenizer's special token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec["hidden"] // spec["heads"]
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    section.append(head_dim // 2 - sum(section))  # temporal, height, width parts of the rotary frequencies
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec["hidden"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv"],
        "intermediate_size": spec["mlp"],
        "max_position_embeddings": 32768,
        "pad_token_id": ids("<|endoftext|>"),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
    }
    tokens = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }
    vision = {
        "depth": spec["v_depth"],
        "num_heads": spec["v_heads"],
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(
            hidden_size=spec["v_hidden"],
            intermediate_size=spec["v_mlp"],
            out_hidden_size=spec["hidden"],
            num_position_embeddings=256,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
    text.update(bos_token_id=None, eos_token_id=ids("<|im_end|>"), tie_word_embeddings=True)
    if family == "qwen2_vl":
        vision.update(
            embed_dim=spec["v_hidden"], hidden_size=spec["hidden"], mlp_ratio=spec["v_mlp"] // spec["v_hidden"]
        )
        return Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            **tokens,
        )
    vision.update(
        hidden_size=spec["v_hidden"],
        intermediate_size=spec["v_mlp"],
        out_hidden_size=spec["hidden"],
        window_size=112,
        fullatt_block_indexes=[spec["v_depth"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        **tokens,
    )


def main() -> None:
    """``python -m glimpse.hf.tiny OUT [--family F] [--size S]``: build a random checkpoint to try the pipeline."""
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random Qwen-VL checkpoint (no download).")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILY_NAMES)
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    args = parser.parse_args()
    print(build_tiny_qwen(args.out, family=args.family, size=args.size))


if __name__ == "__main__":
    main()
