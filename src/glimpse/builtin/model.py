"""The built-in model's architecture: a small convolutional image encoder feeding a Qwen2 text decoder.

A vision transformer trained from scratch on a CPU does not learn to read a digit or find a saturated colour
within the budget (two design studies measured it); a small convolutional network learns both in minutes. So
the built-in model (``glimpse_vl``) encodes each image with a CNN whose output stride is the token cell
(32 pixels): an image of ``h × w`` cells becomes ``h · w`` tokens, each the features of its cell plus learned
row and column embeddings, spliced into the decoder's input where the prompt holds ``<|image_pad|>`` tokens.

It is packaged like a Qwen-VL checkpoint so that every path that runs Qwen runs it unchanged: the config, the
model, the image processor and the processor are registered with transformers' Auto classes (importing this
module registers them); ``from_pretrained`` / ``save_pretrained`` / ``generate`` work; the processor expands
each ``<|image_pad|>`` to one token per cell and returns ``pixel_values`` as rows of cells with an
``image_grid_thw`` of ``(1, rows, columns)`` per image, exactly the shapes Qwen's processors return.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2Model,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.processing_utils import ProcessorMixin

from glimpse.images import PixelLimits, smart_resize

MODEL_TYPE = "glimpse_vl"
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class GlimpseVLConfig(PretrainedConfig):
    """Config of the built-in model: the text decoder's ``Qwen2Config`` and the image encoder's sizes.

    Args:
        text_config: the decoder (a ``Qwen2Config`` or its dict).
        channels: output channels of the encoder's five stride-2 stages (stride 32 in all).
        max_grid: most rows or columns of cells an image may have (size of the position embeddings).
        image_token_id: id of ``<|image_pad|>``.
        min_pixels / max_pixels: the pixel limits the model was trained with (its native limits).
        coordinate_ids / coordinate_values: the location tokens that write one coordinate, and the relative
            position each writes; with them the model points (``Pointer``). Empty: plain token embeddings.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": Qwen2Config}  # noqa: RUF012 (transformers reads this class attribute)

    def __init__(
        self,
        text_config: dict[str, Any] | Qwen2Config | None = None,
        channels: list[int] | tuple[int, ...] = (24, 48, 96, 160, 256),
        max_grid: int = 64,
        image_token_id: int | None = None,
        cell: int = 32,
        min_pixels: int = 65_536,
        max_pixels: int = 196_608,
        coordinate_ids: list[int] | None = None,
        coordinate_values: list[float] | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = Qwen2Config(**text_config)
        self.text_config = text_config if text_config is not None else Qwen2Config()
        self.channels = list(channels)
        self.max_grid = max_grid
        self.image_token_id = image_token_id
        self.cell = cell
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.coordinate_ids = list(coordinate_ids or [])
        self.coordinate_values = list(coordinate_values or [])
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)


class ConvEncoder(nn.Module):
    """Five stride-2 stages (conv, norm, GELU, conv, norm, GELU with a residual): a 32-pixel cell per vector."""

    def __init__(self, channels: list[int], hidden: int, max_grid: int):
        super().__init__()
        stages, c_in = [], 3
        for c in channels:
            stages.append(
                nn.ModuleDict(
                    {
                        "down": nn.Sequential(
                            nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()
                        ),
                        "body": nn.Sequential(
                            nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()
                        ),
                    }
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.project = nn.Linear(c_in, hidden)
        self.rows = nn.Embedding(max_grid, hidden)
        self.cols = nn.Embedding(max_grid, hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) → (H/32 · W/32, hidden), or (N, 3, H, W) → (N, H/32 · W/32, hidden); cells row-major."""
        x = image.unsqueeze(0) if image.dim() == 3 else image
        for stage in self.stages:
            x = stage["down"](x)
            x = x + stage["body"](x)
        _, _, gh, gw = x.shape
        feats = self.project(x.flatten(2).transpose(1, 2))
        # An image longer than max_grid cells on a side (a very elongated zoom) shares the last position.
        last = self.rows.num_embeddings - 1
        r = torch.arange(gh, device=x.device).clamp(max=last).repeat_interleave(gw)
        c = torch.arange(gw, device=x.device).clamp(max=last).repeat(gh)
        feats = feats + self.rows(r) + self.cols(c)
        return feats[0] if image.dim() == 3 else feats


class Pointer(nn.Module):
    """One learned function of a relative position (0–1) shared by image tokens and coordinate tokens.

    An image token at cell centre (x, y) gets ``x_map(f(x)) + y_map(f(y))`` added to its features; a coordinate
    token writing the value v gets ``x_map(f(v))`` added to its input embedding and, since the head is tied, to
    its output embedding. ``f`` is a fixed Fourier code, so a shift (a window's edge is its centre less half its
    side) is a rotation of it, which a linear map learns. Writing a coordinate then means attending to the image
    token where the target is and copying its position, instead of learning 256 arbitrary token meanings.
    """

    FREQUENCIES = 16  # 1 to 32 cycles over the image: finer than the 16-window grid

    def __init__(self, hidden: int):
        super().__init__()
        self.x_map = nn.Linear(2 * self.FREQUENCIES, hidden, bias=False)
        self.y_map = nn.Linear(2 * self.FREQUENCIES, hidden, bias=False)

    def code(self, v: torch.Tensor) -> torch.Tensor:
        # Computed, not a buffer: transformers builds models on the meta device and loads only saved tensors.
        freqs = torch.pi * 2.0 ** torch.linspace(0, 5, self.FREQUENCIES, device=v.device)
        angle = v.float().unsqueeze(-1) * freqs
        return torch.cat([angle.sin(), angle.cos()], -1)

    def cells(self, rows: int, cols: int) -> torch.Tensor:
        """(rows · cols, hidden): the position term of an image's tokens, row-major."""
        device = self.x_map.weight.device
        y = (torch.arange(rows, device=device) + 0.5) / rows
        x = (torch.arange(cols, device=device) + 0.5) / cols
        return (self.y_map(self.code(y))[:, None, :] + self.x_map(self.code(x))[None, :, :]).reshape(rows * cols, -1)


class GlimpseVLPreTrainedModel(PreTrainedModel):
    config_class = GlimpseVLConfig
    config: GlimpseVLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Qwen2DecoderLayer"]  # noqa: RUF012

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GlimpseVLForConditionalGeneration(GlimpseVLPreTrainedModel, GenerationMixin):
    """The built-in model: ``ConvEncoder`` → image tokens → ``Qwen2Model`` → tied LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: GlimpseVLConfig):
        super().__init__(config)
        text = config.text_config
        self.visual = ConvEncoder(config.channels, text.hidden_size, config.max_grid)
        self.model = Qwen2Model(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.pointer = Pointer(text.hidden_size) if config.coordinate_ids else None
        self.post_init()

    def _coordinates(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The coordinate tokens' ids and (coordinate tokens, hidden) what pointing adds to their embeddings."""
        assert self.pointer is not None
        ids = torch.tensor(self.config.coordinate_ids, device=device)
        values = torch.tensor(self.config.coordinate_values, device=device)
        return ids, self.pointer.x_map(self.pointer.code(values))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Rows of cells (as the processor returns them) → one feature vector per image token."""
        cell = self.config.cell
        grids = [tuple(g) for g in image_grid_thw.tolist()]
        starts = np.cumsum([0] + [gh * gw for _, gh, gw in grids]).tolist()
        out: list[torch.Tensor | None] = [None] * len(grids)
        # Images of one grid size go through the encoder together (its norms are per image).
        for grid in dict.fromkeys(grids):
            _, gh, gw = grid
            which = [i for i, g in enumerate(grids) if g == grid]
            rows = torch.stack([pixel_values[starts[i] : starts[i + 1]] for i in which])
            images = rows.view(-1, gh, gw, 3, cell, cell).permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, gh * cell, gw * cell)
            feats = self.visual(images)
            if self.pointer is not None:
                feats = feats + self.pointer.cells(gh, gw).to(feats.dtype)
            for i, f in zip(which, feats, strict=True):
                out[i] = f
        return torch.cat(out)  # type: ignore[arg-type]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,  # accepted as Qwen's models accept it; unused
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        coordinate_ids, table = self._coordinates(self.lm_head.weight.device) if self.pointer else (None, None)
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            if table is not None:
                lookup = torch.full((self.config.text_config.vocab_size,), -1, device=input_ids.device)
                lookup[coordinate_ids] = torch.arange(len(coordinate_ids), device=input_ids.device)
                row = lookup[input_ids]
                extra = table[row.clamp(min=0)] * (row >= 0).unsqueeze(-1)
                inputs_embeds = inputs_embeds + extra.to(inputs_embeds.dtype)
        if pixel_values is not None and input_ids is not None:
            feats = self.image_features(pixel_values.to(inputs_embeds.dtype), image_grid_thw)
            where = input_ids == self.config.image_token_id
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(where.sum())} image tokens in the prompt but {feats.shape[0]} image cells in pixel_values"
                )
            inputs_embeds = inputs_embeds.masked_scatter(where.unsqueeze(-1), feats.to(inputs_embeds.dtype))
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if table is not None:  # the tied head: a coordinate token's output embedding carries its position too
            point = hidden[:, keep, :] @ table.to(hidden.dtype).T
            logits = logits.index_add(-1, coordinate_ids, point)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


class GlimpseVLImageProcessor(BaseImageProcessor):
    """Resize to the cell grid (within the pixel limits), normalise, and cut into rows of 32×32 cells."""

    model_input_names = ["pixel_values", "image_grid_thw"]  # noqa: RUF012

    def __init__(
        self,
        cell: int = 32,
        min_pixels: int = 65_536,
        max_pixels: int = 196_608,
        image_mean: tuple[float, ...] = MEAN,
        image_std: tuple[float, ...] = STD,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.cell, self.min_pixels, self.max_pixels = cell, min_pixels, max_pixels
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def cells(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image → (rows·columns, 3·cell·cell) float32 and its grid (rows, columns)."""
        image = image.convert("RGB")
        w, h = smart_resize(image.width, image.height, PixelLimits(self.min_pixels, self.max_pixels, self.cell))
        if (w, h) != image.size:
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        a = np.asarray(image, dtype=np.float32) / 255.0
        a = (a - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        gh, gw, c = h // self.cell, w // self.cell, self.cell
        rows = a.reshape(gh, c, gw, c, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 3 * c * c)
        return rows, (gh, gw)

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        rows, grids = [], []
        for image in images:
            r, (gh, gw) = self.cells(image)
            rows.append(r)
            grids.append((1, gh, gw))
        data = {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)


class GlimpseVLProcessor(ProcessorMixin):
    """The image processor and the tokenizer; ``<|image_pad|>`` is expanded to one token per image cell."""

    image_token = "<|image_pad|>"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kw: Any):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: Any = None,
        padding: bool | str = False,
        **kwargs: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images:
            images = images if isinstance(images, list | tuple) else [images]
            flat = [im for item in images for im in (item if isinstance(item, list | tuple) else [item])]
            image_inputs = self.image_processor(flat, return_tensors="np")
            counts = iter(int(g[1] * g[2]) for g in image_inputs["image_grid_thw"])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(self.image_token * next(counts) + part for part in parts[1:]))
            texts = expanded
            data.update(image_inputs)
        enc = self.tokenizer(texts, padding=padding, add_special_tokens=False)
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


def register() -> None:
    """Register the built-in model with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GlimpseVLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(GlimpseVLConfig, GlimpseVLForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(GlimpseVLConfig, slow_image_processor_class=GlimpseVLImageProcessor, exist_ok=True)
    AutoProcessor.register(GlimpseVLConfig, GlimpseVLProcessor, exist_ok=True)


register()


# ---------------------------------------------------------------------------------------------------------------
# Location tokens: zoom windows on a coarse grid, written with added tokens whose text is ordinary protocol JSON,
# so a reply of a handful of tokens decodes to `<grounding>{"bbox_2d": [...], "source": "..."}</grounding>`.
# Each coordinate is one token ("0.406, "), so choosing a window is a 16-way choice of column, then of row (the
# far corner follows from the window's side), each learned from every example.
GRID = 16  # window centres per side
WINDOW_SIDES = (1 / 8, 1 / 4)  # relative side of a window: 1/8 of the original, 1/4 of an observation
MAX_SOURCES = 40  # observation_1 … observation_40


def window(side: float, row: int, col: int) -> list[float]:
    """The window of relative side ``side`` centred on grid cell (row, col), shifted inside the image."""

    def span(i: int) -> tuple[float, float]:
        c = (i + 0.5) / GRID
        lo = min(max(c - side / 2, 0.0), 1.0 - side)
        return round(lo, 3), round(lo + side, 3)

    x1, x2 = span(col)
    y1, y2 = span(row)
    return [x1, y1, x2, y2]


BOX_OPEN = '{"bbox_2d": ['


def box_token(box: list[float]) -> str:
    """The box as protocol JSON text (tokenised as BOX_OPEN and four coordinate tokens)."""
    return BOX_OPEN + ", ".join(f"{v:g}" for v in box) + "]"


def coordinate_tokens() -> list[str]:
    """Every coordinate of every grid window, as written before a comma and (for the last) before ']'."""
    values = sorted({v for s in WINDOW_SIDES for r in range(GRID) for v in window(s, r, r)})
    return [*(f"{v:g}, " for v in values), *(f"{v:g}]" for v in values)]


def source_token(source: int) -> str:
    name = "original_image" if source == 0 else f"observation_{source}"
    return f', "source": "{name}"}}'


def location_tokens() -> list[str]:
    """The box opening, every coordinate token and every source token."""
    return [BOX_OPEN, *coordinate_tokens(), *(source_token(i) for i in range(MAX_SOURCES + 1))]


SIZES: dict[str, dict[str, Any]] = {
    # decoder: hidden, layers, heads, kv heads, MLP; encoder: channels of the five stages
    "base": {"hidden": 256, "layers": 4, "heads": 4, "kv": 2, "mlp": 768, "channels": (8, 16, 32, 96, 256)},
    "tiny": {"hidden": 64, "layers": 2, "heads": 2, "kv": 1, "mlp": 128, "channels": (8, 8, 16, 16, 32)},
}


# The built-in model's own prompts, short because every prompt token costs training time on a CPU. Saved with
# the checkpoint; the hf backend offers them as the default prompt file (see glimpse.protocol.prompts).
PROMPT_FILE = "glimpse_prompts.yaml"
PROMPTS = """\
system: |-
  Answer the question about the image. To look closer, zoom with
  <grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding>
  in {coords}; the source may also be "observation_N". Answer with <answer>...</answer>.
observation: |-
  Observation {observation_turn}, of {source}:
  {image}
error: |-
  Error: {error}
"""


def build_builtin(
    out_dir: Any,
    *,
    size: str = "base",
    seed: int = 0,
    min_pixels: int = 65_536,
    max_pixels: int = 147_456,
    pointing: bool = True,
) -> Any:
    """Write a randomly initialised built-in model (config, weights, tokenizer, processor) to ``out_dir``.

    ``pointing`` shares one function of position between image tokens and coordinate tokens (``Pointer``).
    """
    from pathlib import Path

    from glimpse.hf.processor import quiet_progress
    from glimpse.hf.tiny import CHAT_TEMPLATE, build_tokenizer
    from glimpse.protocol.prompts import DEFAULT_PROMPTS

    spec = SIZES[size]
    texts = [p.system + p.user + p.observation + p.error + p.code for p in DEFAULT_PROMPTS.values()] * 4
    texts += [
        f"What is the code written on the small sign with a {c} border? Answer with the code only. "
        f"the sign with a {c} border and a small star in its top-left corner. What colour is the small outlined "
        f"marker? What shape is the small outlined marker? Answer with one of: red, green, blue, orange, purple, "
        f"black, circle, square, triangle, diamond, cross, hexagon. How many small black dots are on? Answer with a "
        "number. Several signs with a border show a number. Exactly one of them has a small red dot in its "
        "bottom-right corner. What is that sign's number? Answer with the number only. Among the signs with a "
        "border, one reads and one reads. Is the sign reading to the left or to the right of the sign reading? "
        "Answer left or right."
        for c in ("red", "green", "blue", "orange", "purple", "yellow", "cyan", "magenta", "brown", "teal")
    ]
    tokenizer = build_tokenizer(1200, seed, texts=texts, extra_tokens=tuple(location_tokens()))
    ids = tokenizer.convert_tokens_to_ids
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        intermediate_size=spec["mlp"],
        max_position_embeddings=16384,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=True,
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        bos_token_id=None,
    )
    coordinates = coordinate_tokens()
    config = GlimpseVLConfig(
        text_config=text,
        coordinate_ids=[ids(t) for t in coordinates] if pointing else [],
        coordinate_values=[float(t.rstrip(", ]")) for t in coordinates] if pointing else [],
        channels=spec["channels"],
        image_token_id=ids("<|image_pad|>"),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = GlimpseVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    out = Path(out_dir)
    quiet_progress()
    model.save_pretrained(out)
    image_processor = GlimpseVLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    GlimpseVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    (out / PROMPT_FILE).write_text(PROMPTS, encoding="utf-8")
    return out
