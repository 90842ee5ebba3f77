"""The built-in model (``glimpse_vl``): region tokens, a small Qwen2 decoder, and a pointer that writes zooms.

Two design studies (``shared/reference/tiny-policy-study*.md``) found that a vision transformer trained from
scratch on a CPU learns nothing in budget, and a grid of 32-pixel cells hides a probe's 20-pixel sign; a third
(``region-token-study.md``) found what does learn: perceive in objects. So:

* **Perception.** Every image the loop shows becomes region tokens (``glimpse.builtin.processing``): a
  training-free proposer's boxes on that image, each crop through a small CNN whose flattened feature map keeps
  where in the crop things are (a code's characters), plus an embedding of the box; a few coarse tiles give a
  low-resolution view of the whole. The question precedes the image in the model's prompt, so region tokens
  attend to it.
* **Acting.** After ``{"bbox_2d": [`` the model writes a zoom by pointing: a query from the decoder's state
  scores every region token of every image so far (keys from the decoder's states at those tokens), and the
  logits of the location tokens become the log of the summed probability of the regions that spell each next
  token (``Pointer``). The written JSON is the chosen region's zoom window and image (``source``), exactly; a
  zoom cannot be malformed.
* **Reading** is the decoder's: answer tokens read the region tokens of the observation.

It is a transformers ``PreTrainedModel`` registered with the Auto classes (importing this module registers
them), so the ``hf`` backend, ``glimpse serve``, SFT and ``glimpse train rl`` run it unchanged. During
``generate`` the region keys and the open zoom are kept on the cache object, so decoding with transformers'
``DynamicCache`` computes image features on the prefill only and points the same way as a full forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
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
from transformers.modeling_outputs import CausalLMOutputWithPast

from glimpse.builtin.processing import (
    BOX_OPEN,
    BOX_VALUES,
    CROP,
    MAX_SOURCES,
    STEPS,
    GlimpseVLImageProcessor,
    GlimpseVLProcessor,
    coordinate_text,
    location_tokens,
    source_text,
)

MODEL_TYPE = "glimpse_vl"
# The pixel limits the model is shown images at: the default first view of the Mini-o3 recipe (2,000,000
# pixels, where a probe's sign spans about 19 × 11 pixels) and a zoom no smaller than 256 × 256.
MIN_PIXELS, MAX_PIXELS = 65_536, 2_000_000
# The decoder's cache argument and the output's cache field: ``cache`` in recent transformers, ``past_key_values``
# before (both are accepted here, so the model runs on either).
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
NEG = -1e4  # the logit of a location token no consistent region spells (finite: safe in bfloat16)


class GlimpseVLConfig(PretrainedConfig):
    """Config of the built-in model: the text decoder's ``Qwen2Config`` and the region encoder's sizes.

    Args:
        text_config: the decoder (a ``Qwen2Config`` or its dict).
        channels: output channels of the region encoder's stride-2 stages.
        pointer_dim: width of the pointer's queries and keys.
        image_token_id: id of ``<|image_pad|>``.
        box_open_id: id of the token that opens a zoom's box (``{"bbox_2d": [``).
        coordinate_ids: ids of the tokens writing grid value k (0..STEPS) before a comma, then before ']'.
        source_ids: ids of the source tokens (original_image, observation_1, …).
        min_pixels / max_pixels: the pixel limits the model was trained with (its native limits).
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": Qwen2Config}  # noqa: RUF012 (transformers reads this class attribute)

    def __init__(
        self,
        text_config: dict[str, Any] | Qwen2Config | None = None,
        channels: list[int] | tuple[int, ...] = (24, 48, 96, 128),
        pointer_dim: int = 128,
        image_token_id: int | None = None,
        box_open_id: int | None = None,
        coordinate_ids: list[int] | None = None,
        source_ids: list[int] | None = None,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
        cell: int = 32,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = Qwen2Config(**text_config)
        self.text_config = text_config if text_config is not None else Qwen2Config()
        self.channels = list(channels)
        self.pointer_dim = pointer_dim
        self.image_token_id = image_token_id
        self.box_open_id = box_open_id
        self.coordinate_ids = list(coordinate_ids or [])
        self.source_ids = list(source_ids or [])
        self.min_pixels, self.max_pixels, self.cell = min_pixels, max_pixels, cell
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)


def fourier(v: torch.Tensor, frequencies: int = 8) -> torch.Tensor:
    """A fixed Fourier code of values in 0–1 (…, n) → (…, n · 2 · frequencies)."""
    freqs = torch.pi * 2.0 ** torch.arange(frequencies, device=v.device, dtype=torch.float32)
    angle = v.float().unsqueeze(-1) * freqs
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(-2)


class RegionEncoder(nn.Module):
    """A region's crop and box → one token: stride-2 conv stages, the flattened feature map (it keeps where in the
    crop each feature is, which reading needs), and a Fourier embedding of the box."""

    def __init__(self, channels: list[int], hidden: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        cells = (CROP[0] >> len(channels)) * (CROP[1] >> len(channels))
        self.project = nn.Linear(c_in * cells, hidden)
        self.box = nn.Linear(4 * 2 * 8, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, ROW) → (tokens, hidden)."""
        pixels = rows[:, :-BOX_VALUES].reshape(-1, 3, *CROP)
        feats = self.cnn(pixels).flatten(1)
        return self.norm(self.project(feats) + self.box(fourier(rows[:, -BOX_VALUES : -BOX_VALUES + 4])))


@dataclass
class PointerState:
    """Per sequence of a batch: the region keys and spellings seen so far, images seen, the zoom being written.

    Lives on the generation cache between decoding steps (``generate``) or for one forward pass (training)."""

    keys: list[list[torch.Tensor]] = field(default_factory=list)
    spells: list[list[torch.Tensor]] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    open_box: list[list[int] | None] = field(default_factory=list)

    def grow(self, batch: int) -> None:
        while len(self.images) < batch:
            self.keys.append([])
            self.spells.append([])
            self.images.append(0)
            self.open_box.append(None)


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
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GlimpseVLForConditionalGeneration(GlimpseVLPreTrainedModel, GenerationMixin):
    """The built-in model: ``RegionEncoder`` → region tokens → ``Qwen2Model`` → tied LM head and the pointer."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: GlimpseVLConfig):
        super().__init__(config)
        text = config.text_config
        self.visual = RegionEncoder(config.channels, text.hidden_size)
        self.model = Qwen2Model(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.query = nn.Linear(text.hidden_size, config.pointer_dim)
        self.key = nn.Linear(text.hidden_size, config.pointer_dim)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def spellings(self, rows: torch.Tensor, source: int) -> torch.Tensor:
        """(tokens, 5) ids: the four coordinate tokens and the source token a zoom into each region writes."""
        window = rows[:, -4:].round().long().clamp(0, STEPS)
        ids = torch.tensor(self.config.coordinate_ids, device=rows.device)
        coords = torch.stack([ids[window[:, i] + (STEPS + 1) * (i == 3)] for i in range(4)], 1)
        src = torch.full_like(coords[:, :1], self.config.source_ids[min(source, len(self.config.source_ids) - 1)])
        return torch.cat([coords, src], 1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,  # accepted as Qwen's models accept it; unused
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """A forward pass; ``position_ids`` (in ``kwargs``) go to the decoder. They are not a named argument on
        purpose: the pointer's region keys live on the generation cache (``PointerState``), which a cache rebuilt
        from bare key/value layers would lose, and the ``hf`` backend continues from such caches only for models
        that name explicit positions; this one's short prompts are computed whole each turn instead."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        where = input_ids == self.config.image_token_id if input_ids is not None else None
        has_images = pixel_values is not None and where is not None and bool(where.any())
        if has_images:
            feats = self.visual(pixel_values.to(inputs_embeds.dtype))
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(where.sum())} image tokens in the prompt but {feats.shape[0]} region rows in pixel_values"
                )
            inputs_embeds = inputs_embeds.masked_scatter(where.unsqueeze(-1), feats.to(inputs_embeds.dtype))
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **{_CACHE_ARG: cache},
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        returned = getattr(outputs, "cache", None) or getattr(outputs, "past_key_values", None)
        if input_ids is not None and self.config.coordinate_ids:
            # the decoder makes the cache on the prefill when none is passed in: the state goes with it
            state = getattr(returned, "glimpse_pointer", None) if returned is not None else None
            if state is None:
                state = PointerState()
                if returned is not None:
                    returned.glimpse_pointer = state
            state.grow(input_ids.shape[0])
            if has_images:
                self._add_regions(state, input_ids, hidden, pixel_values, image_grid_thw)
            logits = self._point(state, input_ids, hidden, logits, logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: returned})

    def _add_regions(
        self,
        state: PointerState,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> None:
        """Record each image's region keys (the decoder's states at its tokens) and spellings, in order."""
        sizes = [int(g[2]) for g in image_grid_thw.tolist()]
        rows_of = pixel_values.split(sizes)
        positions = (input_ids == self.config.image_token_id).nonzero().tolist()  # row-major: images in order
        start = 0
        for size, rows in zip(sizes, rows_of, strict=True):
            b = positions[start][0]
            cols = torch.tensor([p[1] for p in positions[start : start + size]], device=hidden.device)
            start += size
            state.keys[b].append(self.key(hidden[b, cols]))
            state.spells[b].append(self.spellings(rows, state.images[b]))
            state.images[b] += 1

    def _point(
        self,
        state: PointerState,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        logits_to_keep: int | torch.Tensor,
    ) -> torch.Tensor:
        """Replace the logits at every position that writes part of a zoom by the pointer's (module docstring)."""
        length = input_ids.shape[1]
        first_kept = length - logits.shape[1]
        if not isinstance(logits_to_keep, int):
            return logits  # an explicit index set: not used by Glimpse's callers
        box_open = self.config.box_open_id
        where_b, where_t, rows = [], [], []
        for b, seq in enumerate(input_ids.tolist()):
            written = state.open_box[b]
            for t, token in enumerate(seq):
                if token == box_open:
                    written = []
                elif written is not None:
                    written = [*written, token] if len(written) < 4 else None
                if written is None or t < first_kept or not state.keys[b]:
                    continue
                row = self._pointer_row(state, b, hidden[b, t], written, logits.shape[-1])
                if row is not None:
                    where_b.append(b)
                    where_t.append(t - first_kept)
                    rows.append(row)
            state.open_box[b] = written
        if not rows:
            return logits
        index = (torch.tensor(where_b, device=logits.device), torch.tensor(where_t, device=logits.device))
        return logits.index_put(index, torch.stack(rows).to(logits.dtype))

    def _pointer_row(
        self, state: PointerState, b: int, h: torch.Tensor, written: list[int], vocab: int
    ) -> torch.Tensor | None:
        keys, spells = torch.cat(state.keys[b]), torch.cat(state.spells[b])
        j = len(written)
        if j:
            ok = (spells[:, :j] == torch.tensor(written, device=spells.device)).all(1)
            if not bool(ok.any()):
                return None  # a box no region spells (not the model's own): leave the LM head's logits
            keys, spells = keys[ok], spells[ok]
        scores = (keys @ self.query(h)).float() / self.config.pointer_dim**0.5
        top = scores.max()
        mass = torch.zeros(vocab, device=h.device).index_add(0, spells[:, j], (scores - top).exp())
        return torch.where(mass > 0, mass.clamp(min=1e-30).log() + top, torch.full_like(mass, NEG))


def register() -> None:
    """Register the built-in model with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GlimpseVLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(GlimpseVLConfig, GlimpseVLForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(GlimpseVLConfig, slow_image_processor_class=GlimpseVLImageProcessor, exist_ok=True)
    AutoProcessor.register(GlimpseVLConfig, GlimpseVLProcessor, exist_ok=True)


register()


SIZES: dict[str, dict[str, Any]] = {
    # decoder: hidden, layers, heads, kv heads, MLP; region encoder: channels of its four stages
    "base": {"hidden": 256, "layers": 4, "heads": 4, "kv": 2, "mlp": 768, "channels": (24, 48, 96, 128)},
    "tiny": {"hidden": 64, "layers": 2, "heads": 2, "kv": 1, "mlp": 128, "channels": (8, 8, 16, 16)},
}


# The built-in model's own prompts, short because every prompt token costs training time on a CPU; the question
# comes before the image so that the region tokens can attend to it. Saved with the checkpoint; the hf backend
# offers them as the default prompt file (see glimpse.protocol.prompts).
PROMPT_FILE = "glimpse_prompts.yaml"
PROMPTS = """\
system: |-
  Answer the question about the image. To look closer, zoom with
  <grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding>
  in {coords}; the source may also be "observation_N". Answer with <answer>...</answer>.
user: |-
  {question}
  {image}
observation: |-
  Observation {observation_turn}, of {source}:
  {image}
error: |-
  Error: {error}
"""


def tokenizer_corpus(seed: int, per_level: int = 4) -> list[str]:
    """Text the built-in tokenizer's merges are learned from: the prompts and questions of generated probes
    (read from the generator, so the vocabulary follows its wording without this module knowing it)."""
    from glimpse.probes.synth import KINDS, make_probe
    from glimpse.protocol.prompts import DEFAULT_PROMPTS

    texts = [p.system + p.user + p.observation + p.error + p.code for p in DEFAULT_PROMPTS.values()] * 4
    for level in ("easy", "medium", "hard"):
        for i in range(per_level):
            for kind in KINDS:
                rec = make_probe(level, 5_000_000 + i, seed=seed, kind=kind, render=False).record
                texts.append(rec["problem"].replace("<image>", "") + " " + str(rec["solution"]).lower())
    return texts


def build_builtin(
    out_dir: Any,
    *,
    size: str = "base",
    seed: int = 0,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> Any:
    """Write a randomly initialised built-in model (config, weights, tokenizer, processor, prompts) to ``out_dir``."""
    from pathlib import Path

    from glimpse.hf.processor import quiet_progress
    from glimpse.hf.tiny import CHAT_TEMPLATE, build_tokenizer

    spec = SIZES[size]
    tokenizer = build_tokenizer(1200, seed, texts=tokenizer_corpus(seed), extra_tokens=tuple(location_tokens()))
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
    coordinates = [coordinate_text(k, last) for last in (False, True) for k in range(STEPS + 1)]
    config = GlimpseVLConfig(
        text_config=text,
        channels=spec["channels"],
        image_token_id=ids("<|image_pad|>"),
        box_open_id=ids(BOX_OPEN),
        coordinate_ids=[ids(t) for t in coordinates],
        source_ids=[ids(source_text(i)) for i in range(MAX_SOURCES + 1)],
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
