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
* **Reading.** Each image's panel (``glimpse.builtin.reader``: the largest light rectangle, found without
  learning) is read by ``Reader``, one classifier per attribute (a code's characters by position, marker colour
  and shape, dots, corner mark, border), trained on what the teacher knows the panel shows; its readings become
  ``READ_ROWS`` tokens after the image's region tokens, each the expected embedding of its attribute's answer word.

It is a transformers ``PreTrainedModel`` registered with the Auto classes (importing this module registers
them), so the ``hf`` backend, ``glimpse serve``, SFT and ``glimpse train rl`` run it unchanged. During
``generate`` the region keys and the open zoom are kept on the cache object, so decoding with transformers'
``DynamicCache`` computes image features on the prefill only and points the same way as a full forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2Model,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from glimpse.builtin.processing import (
    BOX_OPEN,
    CROP,
    INK,
    KIND,
    MAX_SOURCES,
    MEAN,
    PIXELS,
    READ_ROWS,
    READING,
    REL,
    RING,
    RING_VALUES,
    STD,
    STEPS,
    WINDOW,
    GlimpseVLImageProcessor,
    GlimpseVLProcessor,
    coordinate_text,
    location_tokens,
    source_text,
)
from glimpse.builtin.reader import BLOB_CLASSES, BLOB_VALUES, COLOUR_VALUES, LINE_CROP, READ_CROP, text_line
from glimpse.protocol.tags import CLOSE_CALL as BOX_CLOSE

MODEL_TYPE = "glimpse_vl"
# The pixel limits the model is shown images at: the default first view of the Mini-o3 recipe (2,000,000
# pixels, where a probe's sign spans about 19 × 11 pixels) and a zoom no smaller than 256 × 256.
MIN_PIXELS, MAX_PIXELS = 65_536, 2_000_000
# The decoder's cache argument and the output's cache field: ``cache`` in recent transformers, ``past_key_values``
# before (both are accepted here, so the model runs on either).
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
NEG = -1e4  # the logit of a location token no consistent region spells (finite: safe in bfloat16)
# the reader's attributes an answer writes (a code's characters, a marker's colour and shape, a count of dots)
ANSWER_WORDS = ("char", "marker_color", "marker_shape", "dots")
# what no token of the built-in tokenizer holds: two or more code characters (so a code is written one character
# per token, as the reader reads it); byte-level BPE writes a leading space as "Ġ"
CODE_APART = r"Ġ?[A-Z0-9]{2,}"
COPY_STEPS = 8  # answer positions the copy gate tells apart (a code's characters; later ones share the last)


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
        reader_classes: what the reader reads off a panel: ``[attribute, classes]`` pairs, in order; the first
            ``READ_ROWS`` attributes each become a reading token, the rest only train the reader.
        reader_ids: per reading token's attribute, the token id that starts each class's word (-1: none), so a
            reading token can carry the word's embedding.
        reader_spellings: per reading token's attribute, each class's word as token ids (``[]``: the empty word,
            the answer ends), or ``[]`` for an attribute that is not an answer word: what an answer copies.
        reader_starts: per reading token's attribute, the answer token its word starts at (a code's k-th
            character at k, a word at 0). Checkpoints made before them (empty) copy each class's first token at
            every answer step.
        reader_channels: output channels of the reader's stride-2 stages.
        reader_line: the reader reads a code's characters from the panel's line of text (``Reader``).
        answer_ids: ids of ``<answer>`` and ``</answer>``: inside an answer, each next token may be copied from what
            the reader read in the last image (``GlimpseVLForConditionalGeneration._copy``); empty: no copying.
        ground_dim: width of the grounding match between the question's words and each region (``Grounding``);
            0: none.
        turn_start_id: id of the token that opens a chat turn (``<|im_start|>``): the question's words are the
            tokens of the turn that holds the conversation's first image.
        region_classes: what the region heads tell of the sign a region token shows (``RegionHeads``):
            ``[attribute, classes]`` pairs (a border colour, a corner mark); empty: no heads.
        region_word_ids: per region attribute and class, the token ids of the class's words (empty for the class
            "none"), so the grounding can compare the words the question says with the words a region shows.
        ring_colour: region tokens also embed the colour around the lightest area of their crop
            (``RingProjection``; checkpoints made before it have none).
        box_close_id: id of ``</grounding>``: the only token a zoom's box may be followed by, so the pointer
            writes it after the source (None: the LM head writes it, as checkpoints made before it did).
        no_repeat_zooms: the pointer never points again at a window it already zoomed into from the same source
            (the same zoom shows the same pixels): it offers the best region not yet zoomed into.
        reader_blobs: the reader also counts from the panel's ink blob map (``reader.ink_blobs``, in the reading
            rows' colour values): a small counter adds to the ``dots`` classifier's logits (``Reader``).
        relate: an answer's first token also hears where the observations that read the question's first two codes
            came from, left or right of each other in the first view (``Relation``).
        reader_colours: the reader also reads a marker's colour from the colour of the panel's ink
            (``reader.ink_colour``, in the reading rows' colour values after the blob map): a linear layer adds to the
            ``marker_color`` classifier's logits (``Reader``).
        found: between turns the decoder also hears whether both codes the question names were read (``Found``;
            one code: see ``found_prefix``).
        found_prefix: ``Found`` also hears a question that names one code, as the start of a code (a ``find_code``
            probe's): whether a sign whose code starts with it was read (``named_seen``).
        code_tokens: per class of a code's characters (``char1``'s), the token ids that write it in a question
            (alone, or after a space): how ``Relation`` finds the codes a question names.
        asked_copy: an answer's first token's copy gate also hears the question's words directly (``AskedCopy``):
            which reading attribute the answer starts with, from what the question asks.
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
        reader_classes: list[list[Any]] | None = None,
        reader_ids: list[list[int]] | None = None,
        reader_channels: list[int] | tuple[int, ...] = (32, 64, 96),
        reader_line: bool = False,
        answer_ids: list[int] | None = None,
        reader_spellings: list[list[list[int]]] | None = None,
        reader_starts: list[int] | None = None,
        ground_dim: int = 0,
        turn_start_id: int | None = None,
        region_classes: list[list[Any]] | None = None,
        region_word_ids: list[list[list[int]]] | None = None,
        ring_colour: bool = False,
        box_close_id: int | None = None,
        no_repeat_zooms: bool = False,
        reader_blobs: bool = False,
        relate: bool = False,
        code_tokens: list[list[int]] | None = None,
        reader_colours: bool = False,
        found: bool = False,
        found_prefix: bool = False,
        asked_copy: bool = False,
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
        self.reader_classes = [[str(name), list(classes)] for name, classes in reader_classes or []]
        self.reader_ids = [list(ids) for ids in reader_ids or []]
        self.reader_channels = list(reader_channels)
        self.reader_line = reader_line
        self.answer_ids = list(answer_ids or [])
        self.reader_spellings = [[list(ids) for ids in row] for row in reader_spellings or []]
        self.reader_starts = list(reader_starts or [])
        self.ground_dim, self.turn_start_id = ground_dim, turn_start_id
        self.region_classes = [[str(name), list(classes)] for name, classes in region_classes or []]
        self.region_word_ids = [[list(ids) for ids in row] for row in region_word_ids or []]
        self.ring_colour = ring_colour
        self.box_close_id, self.no_repeat_zooms = box_close_id, no_repeat_zooms
        self.reader_blobs = reader_blobs
        self.relate = relate
        self.code_tokens = [list(ids) for ids in code_tokens or []]
        self.reader_colours = reader_colours
        self.found = found
        self.found_prefix = found_prefix
        self.asked_copy = asked_copy
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)


def fourier(v: torch.Tensor, frequencies: int = 8) -> torch.Tensor:
    """A fixed Fourier code of values in 0–1 (…, n) → (…, n · 2 · frequencies)."""
    freqs = torch.pi * 2.0 ** torch.arange(frequencies, device=v.device, dtype=torch.float32)
    angle = v.float().unsqueeze(-1) * freqs
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(-2)


RING_GAIN = 10.0  # the ring projection's output scale: its values are small (0–1) beside a token's (std about 2)


class RingProjection(nn.Module):
    """The colour around the lightest area of a region's crop (``processing.ring_colour``) → a share of its token.
    Starts at zero, so a checkpoint made before it exists reads its regions as before until trained. Scaled by
    ``RING_GAIN``: at gain 1 it reached 6 % of a token's scale in 25 steps at learning rate 5e-3 (attempt 7)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(RING_VALUES, hidden))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return (values @ self.weight.to(values.dtype)) * RING_GAIN


class RegionEncoder(nn.Module):
    """A region's crop and box → one token: stride-2 conv stages, the flattened feature map (it keeps where in the
    crop each feature is, which reading needs), a Fourier embedding of the box, and the colour around the lightest
    area of the crop (``RingProjection``)."""

    def __init__(self, channels: list[int], hidden: int, ring: bool = False):
        super().__init__()
        self.cnn = _stages(channels)
        c_in = channels[-1]
        cells = (CROP[0] >> len(channels)) * (CROP[1] >> len(channels))
        self.project = nn.Linear(c_in * cells, hidden)
        self.box = nn.Linear(4 * 2 * 8, hidden)
        self.ring = RingProjection(hidden) if ring else None
        self.norm = nn.LayerNorm(hidden)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, ROW) → (tokens, hidden)."""
        pixels = rows[:, :PIXELS].reshape(-1, 3, *CROP)
        token = self.project(self.cnn(pixels).flatten(1)) + self.box(fourier(rows[:, REL]))
        if self.ring is not None:
            token = token + self.ring(rows[:, RING])
        return self.norm(token)


def _stages(channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()]
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c // 4), c), nn.GELU()]
        c_in = c
    return nn.Sequential(*layers)


class Reader(nn.Module):
    """The panel of one image (``glimpse.builtin.reader``, spread over ``READ_ROWS`` rows) → what it shows, and
    ``READ_ROWS`` reading tokens.

    Conv stages keep a feature map of the panel, flattened so each output knows where things are (the region-token
    study: a code's characters read by one classifier per position learned, a CTC over columns did not); one
    classifier per attribute (``config.reader_classes``). Reading token ``j`` is the expected embedding of
    attribute ``j``'s class: its probabilities times the embeddings of the words that start each class (tied to
    the decoder's input embeddings, so an answer can copy the word) plus a learned table, plus the attribute's own
    embedding. The classifiers are trained directly on what the teacher knows the panel shows (``train.py``)
    and by the answers through the tokens.

    With ``config.reader_line``, a code's characters (``char1`` …) are read from the panel's line of text instead
    (``reader.text_line``: left-aligned at a fixed height, its own conv stages): trained on the same 9,000 card
    panels for 3 minutes, texts read exactly went from 3 % (the whole panel) to 57 % (docs/builtin-model.md,
    attempt 9).
    """

    def __init__(self, config: GlimpseVLConfig, hidden: int):
        super().__init__()
        self.cnn = _stages(config.reader_channels)
        cells = (READ_CROP[0] >> len(config.reader_channels)) * (READ_CROP[1] >> len(config.reader_channels))
        self.squeeze = nn.Conv2d(config.reader_channels[-1], 24, 1)
        self.names = [name for name, _ in config.reader_classes]
        sizes = [len(classes) for _, classes in config.reader_classes]
        self.line = config.reader_line
        self.on_line = [self.line and name.startswith("char") for name in self.names]
        if self.line:
            self.line_cnn = _stages(config.reader_channels)
            self.line_squeeze = nn.Conv2d(config.reader_channels[-1], 32, 1)
            line_cells = (LINE_CROP[0] >> len(config.reader_channels)) * (LINE_CROP[1] >> len(config.reader_channels))
        self.heads = nn.ModuleList(
            nn.Linear(32 * line_cells if line else 24 * cells, n) for n, line in zip(sizes, self.on_line, strict=True)
        )
        self.tables = nn.ParameterList(nn.Parameter(torch.zeros(n, hidden)) for n in sizes[:READ_ROWS])
        self.attribute = nn.Parameter(torch.zeros(READ_ROWS, hidden))
        self.box = nn.Linear(4 * 2 * 8, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.word_ids = config.reader_ids
        self.counter = None
        if config.reader_blobs and "dots" in self.names:
            self.counter = BlobCounter(sizes[self.names.index("dots")])
        self.colour = None
        if config.reader_colours and "marker_color" in self.names:
            self.colour = InkColour(sizes[self.names.index("marker_color")])

    def forward(self, rows: torch.Tensor, embed: nn.Embedding) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(panels · READ_ROWS, ROW) → (panels · READ_ROWS, hidden) tokens and each attribute's (panels, classes)
        logits."""
        panels = rows.shape[0] // READ_ROWS
        pixels = rows[:, :PIXELS].reshape(panels, 3, *READ_CROP)
        feats = self.squeeze(self.cnn(pixels)).flatten(1)
        if self.line:
            mean, std = (pixels.new_tensor(v).view(1, -1, 1, 1) for v in (MEAN, STD))
            line = (text_line(pixels.detach() * std + mean) - mean) / std
            line_feats = self.line_squeeze(self.line_cnn(line)).flatten(1)
        logits = {
            n: head(line_feats if on_line else feats)
            for n, head, on_line in zip(self.names, self.heads, self.on_line, strict=True)
        }
        if self.counter is not None:
            blobs = rows[:, RING].reshape(panels, READ_ROWS * RING_VALUES)[:, :BLOB_VALUES]
            logits["dots"] = logits["dots"] + self.counter(blobs).to(logits["dots"].dtype)
        if self.colour is not None:
            ink = rows[:, RING].reshape(panels, READ_ROWS * RING_VALUES)[:, INK]
            logits["marker_color"] = logits["marker_color"] + self.colour(ink).to(logits["marker_color"].dtype)
        box = self.box(fourier(rows[::READ_ROWS, REL]))
        tokens = []
        for j, table in enumerate(self.tables):
            p = logits[self.names[j]].float().softmax(-1).to(rows.dtype)
            t = p @ table + self.attribute[j] + box
            if j < len(self.word_ids):
                ids = torch.tensor(self.word_ids[j], device=rows.device)
                known = ids >= 0
                if bool(known.any()):
                    t = t + p[:, known] @ embed(ids[known]).to(rows.dtype)
            tokens.append(t)
        return self.norm(torch.stack(tokens, 1).flatten(0, 1)), logits


class BlobCounter(nn.Module):
    """A panel's ink blob map (``reader.ink_blobs``: blobs per class and grid cell) → logits over counts.

    It sees the map and, per blob class, its total as a one-hot (0 … ``TOTALS - 1``, more clipped), through a
    small MLP: a count is the blobs that are not something else (a corner mark, stray ink at the panel's edge),
    which a linear layer over the map learned slowly (on 2,400 cards: 39 % of held-out cards' dots right after
    1,500 steps, the MLP 92 %; docs/builtin-model.md, attempt 11). Its last layer starts at zero when added to a
    trained reader (``add_blob_counter``), so the reader reads as before until it is trained.
    """

    TOTALS = 16

    def __init__(self, classes: int, width: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(BLOB_VALUES + BLOB_CLASSES * self.TOTALS, width), nn.GELU(), nn.Linear(width, classes)
        )

    def forward(self, blobs: torch.Tensor) -> torch.Tensor:
        totals = blobs.reshape(len(blobs), BLOB_CLASSES, -1).sum(-1).round().clamp(0, self.TOTALS - 1).long()
        onehot = nn.functional.one_hot(totals, self.TOTALS).to(blobs.dtype).flatten(1)
        return self.mlp(torch.cat([blobs, onehot], 1))


PLACE_STEP = 0.05  # two places this share of the first view's width apart are fully left and right of each other
RELATION_GAIN = 10.0  # ``Relation.direction`` starts at zero and must grow fast


def question_codes(words: list[int], chars: dict[int, int], longest: int) -> list[list[int]]:
    """The codes a question names, as character classes: runs of 2 to ``longest`` consecutive tokens that each
    write one code character (``chars``: token id → class), distinct, in the order they first appear."""
    codes: list[list[int]] = []
    run: list[int] = []
    for token in [*words, None]:
        c = chars.get(token) if token is not None else None
        if c is not None:
            run.append(c)
            continue
        if 2 <= len(run) <= longest and run not in codes:
            codes.append(run)
        run = []
    return codes


def code_match(read: torch.Tensor, code: list[int], rows: list[int], empty: int) -> torch.Tensor:
    """The probability that an image's reading (``read``: per reading attribute, class probabilities) is ``code``:
    per character attribute (``rows``, in order), the code's character there, or the empty class past its end."""
    p = read.new_ones(())
    for j, row in enumerate(rows):
        p = p * read[row, code[j] if j < len(code) else empty]
    return p


def relation(
    codes: list[list[int]], reads: list[torch.Tensor], places: list[float | None], rows: list[int], empty: int
) -> torch.Tensor | None:
    """Where the first code a question names was seen relative to the second, in -1 (left) … 1 (right), scaled by
    how sure the reading of each is: for each code, the places (an observation's panel centre, across the first
    view) of the observations weighed by how well their reading matches it (``code_match``); None without two
    codes or without an observation placed."""
    named = _named_places(codes, reads, places, rows, empty)
    if named is None or len(named) < 2:
        return None
    (x1, sure1), (x2, sure2) = named
    return ((x1 - x2) / PLACE_STEP).clamp(-1.0, 1.0) * sure1 * sure2


def named_seen(
    codes: list[list[int]],
    reads: list[torch.Tensor],
    places: list[float | None],
    rows: list[int],
    empty: int,
    prefix: bool = False,
) -> torch.Tensor | None:
    """How sure it is that both of the first two codes a question names were read in placed observations (the
    product, per code, of the best match of an observation's reading); None where ``relation`` is. With
    ``prefix``, a question that names one code asks for the sign whose code starts with it: how sure it is that
    one was read."""
    named = _named_places(codes, reads, places, rows, empty, prefix)
    if named is None:
        return None
    return named[0][1] if len(named) == 1 else named[0][1] * named[1][1]


def _named_places(
    codes: list[list[int]],
    reads: list[torch.Tensor],
    places: list[float | None],
    rows: list[int],
    empty: int,
    prefix: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per code of the first two a question names: where the observations reading it were (their places weighed
    by the match) and the best match; None without two codes (with ``prefix``: one, matched as the start of a
    read code) or without an observation placed."""
    if len(codes) < 2 and not (prefix and len(codes) == 1):
        return None
    seen = [k for k in range(1, min(len(reads), len(places))) if places[k] is not None]
    if not seen:
        return None
    where = reads[0].new_tensor([places[k] for k in seen])
    out = []
    for code in codes[:2]:
        upto = rows[: len(code)] if len(codes) == 1 else rows  # a prefix's characters, nothing about what follows
        m = torch.stack([code_match(reads[k], code, upto, empty) for k in seen])
        out.append(((m * where).sum() / m.sum().clamp(min=1e-6), m.max()))
    return out


class Relation(nn.Module):
    """Left or right, from where the model looked: for an answer's first token, ``relation`` (where the sign read as
    the question's first code was seen relative to the one read as its second) times a learned direction in the
    decoder's space, through the LM head. The decoder alone never learned it: the places of two zooms are in
    their coordinate tokens and the codes in the reader's probabilities, and attempt 11's model answered "left"
    to every such question. Starts at zero (``add_relation``), so answers are unchanged until trained."""

    def __init__(self, hidden: int):
        super().__init__()
        self.direction = nn.Parameter(torch.zeros(hidden))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        """(n,) relations → (n, hidden) shifts of the decoder's state."""
        return d.unsqueeze(-1) * self.direction.to(d.dtype) * RELATION_GAIN


class Found(Relation):
    """Whether to look further: outside answers and zooms, ``named_seen`` (both signs the question names read
    already) times a learned direction in the decoder's space, through the LM head; a scan (``teacher.scans``)
    answers once both are seen. Starts at zero (``add_found``), so nothing changes until trained."""


ASKED_GAIN = 10.0  # ``AskedCopy``'s output scale: its votes start at zero and must grow fast


class AskedCopy(nn.Module):
    """Which reading attribute an answer starts by copying, from the question's words: each word's learned vote
    over the copy gate's choices (``READ_ROWS`` attributes and the LM head), averaged over the question, added to
    the gate's logits at an answer's first token. The gate hears the decoder's state too, but a fresh decoder's
    state at ``<answer>``, after the images, carried the question's kind poorly: run S3 (attempt 18) copied later
    tokens of a word right and chose its first one at random (gate about 0.3 on the right attribute after 800
    searches). A bag of words is what that choice needs ("colour", "shape", "many", "code"). Starts at zero
    (``add_asked_copy``), so answers are unchanged until trained."""

    def __init__(self, vocab: int, choices: int):
        super().__init__()
        self.votes = nn.Parameter(torch.zeros(vocab, choices))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """(n,) the question's word ids → (choices,) logits to add to the gate's."""
        return self.votes[words].mean(0) * ASKED_GAIN


INK_GAIN = 10.0  # ``InkColour``'s output scale: its values are shares (0–1) and it starts at zero


class InkColour(nn.Module):
    """The colour of a panel's ink (``reader.ink_colour``) → logits over marker colours, added to the reader's.

    Linear: on 600 card panels a logistic regression over these values told every marker colour of 180 probe
    observations (easy, medium, hard) right, where the reader's convolutions, trained on crisp cards, read easy
    probes' blurred dark blue markers as black (docs/builtin-model.md, attempt 12). Starts at zero
    (``add_ink_colour``), so the reader reads as before until it is trained."""

    def __init__(self, classes: int):
        super().__init__()
        self.linear = nn.Linear(COLOUR_VALUES, classes)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.linear(values) * INK_GAIN


class Grounding(nn.Module):
    """How well the question's words describe each region: the best match, over the words, between a word (its
    embedding and the next token's, so "red border" and "red," in a list of answers differ) and the region's
    token from the region encoder (both projected to ``dim``), added to the pointer's score of the region with a
    weight read from the decoder's state where it points. Training also scores the match alone on the teacher's
    first zoom (``glimpse.builtin.train.grounding_loss``).

    A short path from a word of the question (a border colour, "dots") to the regions it describes: without it
    the pointer had to carry the word from the question through the decoder's attention to the box it opens,
    and on easy probes, where only the border colour named in the question singles out the target, it chose a
    sign of the right kind in the wrong colour (teacher-forced first zoom 46 % on 120 easy probes; the target
    was in its top three 77 % of the time). It starts switched off (the region projection is zero), so adding it
    to a trained checkpoint changes nothing until it is trained.

    With ``RegionHeads``, a region also brings the words of what its heads see (its border colour's name, its
    corner mark's), projected by ``seen``: the match can then compare a said word with a seen word, which attempt
    6 found the region token alone did not offer for border colours (0 % teacher-forced on count and marker-colour
    questions of easy probes, where the border colour is all that singles out the target).
    """

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.dim = dim
        self.word = nn.Parameter(torch.empty(hidden, dim))
        self.next = nn.Parameter(torch.empty(hidden, dim))
        self.region = nn.Parameter(torch.empty(hidden, dim))
        self.seen = nn.Parameter(torch.empty(hidden, dim))
        self.gate = nn.Parameter(torch.empty(hidden))
        self.bias = nn.Parameter(torch.empty(()))

    def reset(self) -> None:
        nn.init.normal_(self.word, std=self.word.shape[0] ** -0.5)
        nn.init.normal_(self.next, std=self.next.shape[0] ** -0.5)
        nn.init.zeros_(self.region)
        nn.init.zeros_(self.seen)
        nn.init.zeros_(self.gate)
        nn.init.ones_(self.bias)

    def match(self, words: torch.Tensor, regions: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(words, hidden) embeddings and (regions, hidden) tokens, optionally with (regions, hidden) embeddings of
        the words each region shows (``RegionHeads.words``) → (regions,) best-word match."""
        if words.shape[0] == 0:
            return regions.new_zeros(regions.shape[0])
        dtype = regions.dtype
        words = words.to(dtype)
        following = torch.cat([words[1:], words.new_zeros(1, words.shape[1])])
        said = words @ self.word.to(dtype) + following @ self.next.to(dtype)
        shown = regions @ self.region.to(dtype)
        if seen is not None:
            shown = shown + seen.to(dtype) @ self.seen.to(dtype)
        scores = shown @ said.T
        return scores.max(1).values / self.dim**0.5

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        """The weight of the match in the pointer's score, from the decoder's state ``h`` (…, hidden) → (…, 1)."""
        return (h @ self.gate.to(h.dtype) + self.bias.to(h.dtype)).unsqueeze(-1)


AGREE_GAIN = 10.0  # the agreement's weight scale (``RegionHeads.agree`` starts at zero and must grow fast)


class RegionHeads(nn.Module):
    """What sign each region shows, per attribute (``config.region_classes``: its border colour, its corner mark):
    one linear classifier each on the region's token and, with the ring colour (``config.ring_colour``), on its
    ring values directly; trained on what the teacher knows each region of a first view shows
    (``glimpse.builtin.train.region_loss``). They make the region encoder put those attributes in its tokens, and
    give the grounding the words of what they see (``words``).
    """

    def __init__(self, config: GlimpseVLConfig, hidden: int):
        super().__init__()
        self.names = [name for name, _ in config.region_classes]
        self.heads = nn.ModuleList(nn.Linear(hidden, len(classes)) for _, classes in config.region_classes)
        sizes = [len(classes) for _, classes in config.region_classes]
        self.ring = nn.ModuleList(nn.Linear(RING_VALUES, n) for n in sizes) if config.ring_colour else None
        self.word_ids = config.region_word_ids
        # what the question asks for, per attribute: attention over its words (each read with the next one, as
        # the grounding reads them; one attention per attribute: shared, the corner mark's words took it all and
        # the border colour was never learned, attempt 7) and one classifier each; the weight of the agreement
        self.attend = nn.Linear(2 * hidden, len(sizes))
        self.asked = nn.ModuleList(nn.Linear(2 * hidden, n) for n in sizes)
        self.agree = nn.Parameter(torch.zeros(()))

    def ask(self, words: torch.Tensor) -> dict[str, torch.Tensor]:
        """(words, hidden) embeddings of the question → each attribute's (classes,) logits: what the sign asked
        about shows (its border colour, its corner mark), trained on what the teacher knows of the target."""
        following = torch.cat([words[1:], words.new_zeros(1, words.shape[1])])
        pairs = torch.cat([words, following], -1)
        pooled = self.attend(pairs).float().softmax(0).to(pairs.dtype).T @ pairs  # (attributes, 2 · hidden)
        return {name: head(pooled[j]) for j, (name, head) in enumerate(zip(self.names, self.asked, strict=True))}

    def agreement(self, asked: dict[str, torch.Tensor], seen: dict[str, torch.Tensor]) -> torch.Tensor:
        """(regions,) how well each region's sign (``seen`` logits) is the one asked about: the sum over
        attributes of the log-probability that both name the same class, weighted by ``agree`` (times
        ``AGREE_GAIN``; it starts at zero, so the heads change nothing until trained)."""
        total = 0.0
        for name in self.names:
            same = seen[name].float().softmax(-1) @ asked[name].float().softmax(-1)
            total = total + same.clamp(min=1e-6).log()
        return self.agree * AGREE_GAIN * total

    def forward(self, tokens: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """(regions, hidden) tokens and their (regions, ROW) rows → each attribute's (regions, classes) logits."""
        out = {name: head(tokens) for name, head in zip(self.names, self.heads, strict=True)}
        if self.ring is not None:
            values = rows[:, RING].to(tokens.dtype)
            out = {name: out[name] + head(values) for name, head in zip(self.names, self.ring, strict=True)}
        return out

    def words(self, logits: dict[str, torch.Tensor], embed: nn.Embedding) -> torch.Tensor:
        """The expected embedding of the words naming what each region shows, summed over attributes: per class,
        the mean embedding of its words (nothing for the class "none"), weighted by its probability."""
        first = next(iter(logits.values()))
        out = first.new_zeros(first.shape[0], embed.embedding_dim)
        for name, ids in zip(self.names, self.word_ids, strict=True):
            table = torch.stack(
                [
                    embed(torch.tensor(c, device=first.device)).mean(0) if c else first.new_zeros(embed.embedding_dim)
                    for c in ids
                ]
            ).to(first.dtype)
            out = out + logits[name].float().softmax(-1).to(first.dtype) @ table
        return out


def question_words(
    ids: list[int], turn_start: int | None, image: int | None, turn: list[int]
) -> tuple[list[int], bool]:
    """Walk ``ids`` from ``turn`` (the tokens of the turn open before them): the tokens of the turn open at the
    first image token (the question's, with ``True``), or the turn still open after the last token (``False``)."""
    turn = list(turn)
    for token in ids:
        if token == turn_start:
            turn = []
        elif token == image:
            return turn, True
        else:
            turn.append(token)
    return turn, False


@dataclass
class PointerState:
    """Per sequence of a batch: the region keys and spellings seen so far, images seen, the zoom being written.

    Lives on the generation cache between decoding steps (``generate``) or for one forward pass (training). The
    ``hf`` backend keeps each row with that row's past key/values between turns (``row``) and puts the rows back
    on the cache it rebuilds from them (``after``, ``stack``), so a continued conversation points as one computed
    whole. Rows copy their lists and share their tensors (no forward pass changes a tensor it has stored)."""

    keys: list[list[torch.Tensor]] = field(default_factory=list)
    spells: list[list[torch.Tensor]] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    open_box: list[list[int] | None] = field(default_factory=list)
    box_open: int | None = None  # the id that opens a zoom's box (``GlimpseVLConfig.box_open_id``)
    # per image: what the reader read, as each reading attribute's word distribution over the vocabulary
    reads: list[list[torch.Tensor]] = field(default_factory=list)
    in_answer: list[tuple[int, ...] | None] = field(default_factory=list)  # the answer's tokens so far, None outside
    answer_ids: tuple[int, ...] = ()  # ``<answer>``, ``</answer>``
    # the question's words (the tokens of the turn holding the first image; ``Grounding``) once it is seen, and
    # until then the tokens of the turn still open; ``turn_start``/``image_token``: the ids that delimit them
    words: list[list[int] | None] = field(default_factory=list)
    turn: list[list[int]] = field(default_factory=list)
    turn_start: int | None = None
    image_token: int | None = None
    zoomed: list[list[tuple[int, ...]]] = field(default_factory=list)  # each zoom written so far: its box's tokens
    # per image: the part of the first image it shows (first-view coordinates, 0–1; None: not known) and its
    # panel's centre across the first view (``Relation``); the last zoom written that no image has followed yet
    windows: list[list[tuple[float, ...] | None]] = field(default_factory=list)
    places: list[list[float | None]] = field(default_factory=list)
    pending: list[tuple[int, ...] | None] = field(default_factory=list)

    def grow(self, batch: int) -> None:
        while len(self.images) < batch:
            self.windows.append([])
            self.places.append([])
            self.pending.append(None)
            self.zoomed.append([])
            self.keys.append([])
            self.spells.append([])
            self.images.append(0)
            self.open_box.append(None)
            self.reads.append([])
            self.in_answer.append(None)
            self.words.append(None)
            self.turn.append([])

    def see(self, b: int, ids: list[int]) -> list[int] | None:
        """Row ``b`` reads ``ids`` (its next tokens): its question's words, found at its first image."""
        if self.words[b] is None:
            found, at_image = question_words(ids, self.turn_start, self.image_token, self.turn[b])
            if at_image:
                self.words[b], self.turn[b] = found, []
            else:
                self.turn[b] = found
        return self.words[b]

    def starts_image(self, token: int, previous: int | None) -> bool:
        """Whether ``token``, after ``previous``, is an image's first token (an image's tokens are one run)."""
        return token == self.image_token != previous

    def box_step(self, written: list[int] | None, token: int) -> tuple[list[int] | None, tuple[int, ...] | None]:
        """The zoom being written after ``token``, from ``written`` before it (None: not in a zoom's box), and the
        box's tokens (four coordinates and the source) when ``token`` completes it."""
        if token == self.box_open:
            return [], None
        if written is None:
            return None, None
        if len(written) < 4:
            return [*written, token], None
        return None, (*written, token)

    def answer_step(self, written: tuple[int, ...] | None, token: int) -> tuple[int, ...] | None:
        """The answer's tokens after ``token``, from ``written`` before it (None: not in an answer)."""
        if self.answer_ids and token == self.answer_ids[0]:
            return ()
        if written is None or (self.answer_ids and token == self.answer_ids[1]):
            return None
        return (*written, token)

    def row(self, b: int) -> PointerState:
        """Row ``b`` as a one-row state (its open zoom left out: ``after`` replays it from the tokens)."""
        return PointerState(
            [list(self.keys[b])],
            [list(self.spells[b])],
            [self.images[b]],
            [None],
            self.box_open,
            [list(self.reads[b])],
            [None],
            self.answer_ids,
            [self.words[b]],
            [list(self.turn[b])],
            self.turn_start,
            self.image_token,
            [list(self.zoomed[b])],
            [list(self.windows[b])],
            [list(self.places[b])],
            [self.pending[b]],
        )

    def after(self, ids: list[int], images: int) -> PointerState:
        """This one-row state as it stood after ``ids``, a prefix of its tokens holding its first ``images`` images:
        later images dropped, the zoom being written replayed from the tokens (as ``_point`` steps through them)."""
        written: list[int] | None = None
        answered: tuple[int, ...] | None = None
        pending: tuple[int, ...] | None = None
        zoomed = []
        previous = None
        for token in ids:
            if self.starts_image(token, previous):
                pending = None
            previous = token
            written, done = self.box_step(written, token)
            if done is not None:
                zoomed.append(done)
                pending = done
            answered = self.answer_step(answered, token)
        words, at_image = question_words(ids, self.turn_start, self.image_token, [])
        return PointerState(
            [self.keys[0][:images]],
            [self.spells[0][:images]],
            [images],
            [written],
            self.box_open,
            [self.reads[0][:images]],
            [answered],
            self.answer_ids,
            [words if at_image else None],
            [[] if at_image else words],
            self.turn_start,
            self.image_token,
            [zoomed],
            [self.windows[0][:images]],
            [self.places[0][:images]],
            [pending],
        )

    @staticmethod
    def stack(rows: list[PointerState | None]) -> PointerState:
        """One state whose row i is ``rows[i]``'s only row (None: an empty row), copied, so rows repeated for ``n``
        samples grow apart."""
        box_open = next((r.box_open for r in rows if r is not None), None)
        answer_ids = next((r.answer_ids for r in rows if r is not None), ())
        first = next((r for r in rows if r is not None), None)
        out = PointerState(
            box_open=box_open,
            answer_ids=answer_ids,
            turn_start=first.turn_start if first else None,
            image_token=first.image_token if first else None,
        )
        for r in rows:
            out.grow(len(out.images) + 1)
            if r is not None:
                out.keys[-1], out.spells[-1] = list(r.keys[0]), list(r.spells[0])
                out.images[-1], out.open_box[-1] = r.images[0], r.open_box[0]
                out.reads[-1], out.in_answer[-1] = list(r.reads[0]), r.in_answer[0]
                out.words[-1], out.turn[-1] = r.words[0], list(r.turn[0])
                out.zoomed[-1] = list(r.zoomed[0])
                out.windows[-1], out.places[-1] = list(r.windows[0]), list(r.places[0])
                out.pending[-1] = r.pending[0]
        return out

    @property
    def nbytes(self) -> int:
        """Memory the stored tensors hold."""
        rows = (self.keys, self.spells, self.reads)
        return sum(t.numel() * t.element_size() for group in rows for row in group for t in row)


@dataclass
class GlimpseVLOutput(CausalLMOutputWithPast):
    """The language model's output plus the reader's logits per attribute, one row per image (training reads
    them; generation ignores them)."""

    reader_logits: dict[str, torch.Tensor] | None = None
    # per region attribute (``RegionHeads``), (region rows of every image, in row order, classes) logits
    region_logits: dict[str, torch.Tensor] | None = None


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
        elif isinstance(module, Grounding):
            module.reset()
        elif isinstance(module, RingProjection):
            nn.init.zeros_(module.weight)
        elif isinstance(module, Relation):  # and Found
            nn.init.zeros_(module.direction)
        elif isinstance(module, AskedCopy):
            nn.init.zeros_(module.votes)
        elif isinstance(module, InkColour):
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)
        elif isinstance(module, RegionHeads):  # heads added to an older checkpoint start small
            for head in [*module.heads, *(module.ring or []), *module.asked, module.attend]:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
            nn.init.zeros_(module.agree)
        elif isinstance(module, Reader):  # its bare parameters (a reader added to an older checkpoint too)
            nn.init.zeros_(module.attribute)
            for table in module.tables:
                nn.init.zeros_(table)


class GlimpseVLForConditionalGeneration(GlimpseVLPreTrainedModel, GenerationMixin):
    """The built-in model: ``RegionEncoder`` → region tokens → ``Qwen2Model`` → tied LM head and the pointer."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012
    # what looks at pixels beside ``visual`` (the region encoder): frozen with it where a recipe freezes vision
    # (``glimpse.train.common.prepare_model``; Mini-o3's RL keeps the vision tower as SFT left it)
    vision_prefixes = ("reader.", "region_heads.")

    def __init__(self, config: GlimpseVLConfig):
        super().__init__(config)
        text = config.text_config
        self.visual = RegionEncoder(config.channels, text.hidden_size, ring=config.ring_colour)
        self.reader = Reader(config, text.hidden_size) if config.reader_classes else None
        copying = self.reader is not None and len(config.answer_ids) == 2
        # inside an answer: how much of the next token to copy from each reading attribute (and how much the LM
        # head's), from the decoder's state and how many answer tokens are written
        self.copy_gate = nn.Linear(text.hidden_size, READ_ROWS + 1) if copying else None
        self.copy_step = nn.Embedding(COPY_STEPS, READ_ROWS + 1) if copying else None
        self.spelled = answer_words(config) if copying else []
        self.relation = Relation(text.hidden_size) if config.relate and copying else None
        self.found = Found(text.hidden_size) if config.found and copying else None
        self.asked_copy = AskedCopy(text.vocab_size, READ_ROWS + 1) if config.asked_copy and copying else None
        # what ``Relation`` reads: a zoom's coordinate and source tokens as values, the question's code characters
        self._coordinate = {t: (i % (STEPS + 1)) / STEPS for i, t in enumerate(config.coordinate_ids)}
        self._source = {t: i for i, t in enumerate(config.source_ids)}
        self._chars, self._char_rows, self._empty = code_characters(config, self.spelled)
        self.model = Qwen2Model(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.query = nn.Linear(text.hidden_size, config.pointer_dim)
        self.key = nn.Linear(text.hidden_size, config.pointer_dim)
        grounded = config.ground_dim > 0 and config.turn_start_id is not None
        self.grounding = Grounding(text.hidden_size, config.ground_dim) if grounded else None
        self.region_heads = RegionHeads(config, text.hidden_size) if config.region_classes else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def spellings(self, rows: torch.Tensor, source: int) -> torch.Tensor:
        """(tokens, 5) ids: the four coordinate tokens and the source token a zoom into each region writes."""
        window = rows[:, WINDOW].round().long().clamp(0, STEPS)
        ids = torch.tensor(self.config.coordinate_ids, device=rows.device)
        coords = torch.stack([ids[window[:, i] + (STEPS + 1) * (i == 3)] for i in range(4)], 1)
        src = torch.full_like(coords[:, :1], self.config.source_ids[min(source, len(self.config.source_ids) - 1)])
        return torch.cat([coords, src], 1)

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
        cache: Any = None,
        **kwargs: Any,
    ) -> GlimpseVLOutput:
        """A forward pass. The pointer's state (``PointerState``) lives on the cache: found there when the cache
        carries one (a later decoding step, or a cache the ``hf`` backend rebuilt from kept key/values and put the
        state back on), else made and attached to it. ``position_ids`` go to the decoder as given (the ``hf``
        backend names them to continue a conversation from its kept key/values)."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        where = input_ids == self.config.image_token_id if input_ids is not None else None
        has_images = pixel_values is not None and where is not None and bool(where.any())
        reader_logits = region_logits = feats = None
        if has_images:
            feats, reader_logits = self.image_features(pixel_values.to(inputs_embeds.dtype))
            if self.region_heads is not None:
                region = pixel_values[:, KIND] != READING
                region_logits = self.region_heads(feats[region], pixel_values[region])
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(
                    f"{int(where.sum())} image tokens in the prompt but {feats.shape[0]} region rows in pixel_values"
                )
            inputs_embeds = inputs_embeds.masked_scatter(where.unsqueeze(-1), feats.to(inputs_embeds.dtype))
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
                state = PointerState(
                    box_open=self.config.box_open_id,
                    answer_ids=tuple(self.config.answer_ids),
                    turn_start=self.config.turn_start_id,
                    image_token=self.config.image_token_id,
                )
                if returned is not None:
                    returned.glimpse_pointer = state
            state.grow(input_ids.shape[0])
            seen = enumerate(input_ids.tolist())
            asks = any(m is not None for m in (self.grounding, self.relation, self.found, self.asked_copy))
            words = [state.see(b, seq) for b, seq in seen] if asks else None
            if has_images:
                self._add_regions(
                    state, input_ids, hidden, pixel_values, image_grid_thw, reader_logits, feats, words, region_logits
                )
            in_answer, boxes = list(state.in_answer), list(state.open_box)
            images = list(state.images)  # counted after this pass's images: its positions see fewer
            logits = self._point(state, input_ids, hidden, logits, logits_to_keep)
            logits = self._relate(state, in_answer, boxes, images, input_ids, logits, logits_to_keep)
            if self.copy_gate is not None:
                logits = self._copy(state, in_answer, input_ids, hidden, logits, logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return GlimpseVLOutput(
            loss=loss,
            logits=logits,
            reader_logits=reader_logits,
            region_logits=region_logits,
            **{_CACHE_FIELD: returned},
        )

    def image_features(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Every image's rows → one token each (region rows through the region encoder, each image's reading
        rows through the reader), in row order, and the reader's logits (None without a reader)."""
        reading = rows[:, KIND] == READING
        if not bool(reading.any()):
            return self.visual(rows), None
        if self.reader is None:
            raise ValueError(
                "pixel_values hold reading rows but this checkpoint has no reader; upgrade it with "
                "glimpse.builtin.model.add_reader(folder)"
            )
        feats = torch.empty(rows.shape[0], self.config.text_config.hidden_size, dtype=rows.dtype, device=rows.device)
        feats[~reading] = self.visual(rows[~reading]).to(rows.dtype)
        tokens, logits = self.reader(rows[reading], self.model.embed_tokens)
        feats[reading] = tokens.to(rows.dtype)
        return feats, logits

    def _add_regions(
        self,
        state: PointerState,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        reader_logits: dict[str, torch.Tensor] | None = None,
        feats: torch.Tensor | None = None,
        question: list[list[int] | None] | None = None,
        region_logits: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Record each image's region keys (the decoder's states at its tokens; with ``Grounding``, one more
        value: how well the row's ``question`` words describe the region's token ``feats``, and with
        ``RegionHeads`` how well what its heads see (``region_logits``, region rows in order) agrees with what the
        question asks for) and spellings, and what the reader read in it (``words``), in order."""
        sizes = [int(g[2]) for g in image_grid_thw.tolist()]
        rows_of = pixel_values.split(sizes)
        feats_of = feats.split(sizes) if feats is not None else [None] * len(sizes)
        shown_of: list[dict[str, torch.Tensor] | None] = [None] * len(sizes)
        if region_logits is not None:
            counts = [int((rows[:, KIND] != READING).sum()) for rows in rows_of]
            split = {name: logits.split(counts) for name, logits in region_logits.items()}
            shown_of = [{name: parts[i] for name, parts in split.items()} for i in range(len(sizes))]
        positions = (input_ids == self.config.image_token_id).nonzero().tolist()  # row-major: images in order
        words = self.words(reader_logits) if reader_logits else None
        ids = input_ids.tolist()
        zooms = {b: self._zooms_before_images(state, b, ids[b]) for b in {p[0] for p in positions}}
        start = 0
        for i, (size, rows, tokens) in enumerate(zip(sizes, rows_of, feats_of, strict=True)):
            b = positions[start][0]
            self._place(state, b, zooms[b].pop(0) if zooms[b] else None, rows)
            cols = torch.tensor([p[1] for p in positions[start : start + size]], device=hidden.device)
            start += size
            region = rows[:, KIND] != READING
            keys = self.key(hidden[b, cols[region]])
            if self.grounding is not None and question is not None and tokens is not None:
                said = torch.tensor(question[b] or [], dtype=torch.long, device=hidden.device)
                shown = tokens[region]
                seen = agree = None
                said_words = self.model.embed_tokens(said)
                logits = shown_of[i]
                if self.region_heads is not None and logits is not None:
                    seen = self.region_heads.words(logits, self.model.embed_tokens)
                    if len(said):
                        agree = self.region_heads.agreement(self.region_heads.ask(said_words), logits)
                match = self.grounding.match(said_words, shown, seen)
                if agree is not None:
                    match = match + agree.to(match.dtype)
                keys = torch.cat([keys, match.unsqueeze(-1).to(keys.dtype)], -1)
            state.keys[b].append(keys)
            state.spells[b].append(self.spellings(rows[region], state.images[b]))
            if words is not None:
                state.reads[b].append(words[i])
            state.images[b] += 1

    def _zooms_before_images(self, state: PointerState, b: int, seq: list[int]) -> list[tuple[int, ...] | None]:
        """Per image starting in ``seq`` (row ``b``'s tokens of this pass), the zoom written last before it that no
        image followed yet (its box's tokens; None: none), as ``_point`` will step through them."""
        written, pending, previous = state.open_box[b], state.pending[b], None
        out = []
        for token in seq:
            if state.starts_image(token, previous):
                out.append(pending)
                pending = None
            previous = token
            written, done = state.box_step(written, token)
            if done is not None:
                pending = done
        return out

    def _place(self, state: PointerState, b: int, zoom: tuple[int, ...] | None, rows: torch.Tensor) -> None:
        """Record where row ``b``'s next image lies in its first (the whole first view; an observation: the window
        of the ``zoom`` it follows, composed with its source's) and its panel's centre across the first view."""
        window: tuple[float, ...] | None = (0.0, 0.0, 1.0, 1.0)
        if state.images[b]:
            window = None
            coords = [self._coordinate.get(t) for t in zoom[:4]] if zoom is not None else []
            source = self._source.get(zoom[4]) if zoom is not None else None
            known = state.windows[b]
            if len(coords) == 4 and None not in coords and source is not None and source < len(known):
                parent = known[source]
                if parent is not None:
                    x0, y0, x1, y1 = parent
                    w, h = x1 - x0, y1 - y0
                    window = (x0 + coords[0] * w, y0 + coords[1] * h, x0 + coords[2] * w, y0 + coords[3] * h)
        panel = rows[rows[:, KIND] == READING]
        place = None
        if window is not None and len(panel):
            r = panel[0, REL].tolist()
            place = window[0] + (r[0] + r[2]) / 2 * (window[2] - window[0])
        state.windows[b].append(window)
        state.places[b].append(place)

    def words(self, reader_logits: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(images, READ_ROWS, classes): per image and reading attribute, the reader's class probabilities (zero
        past an attribute's classes), which ``_copy`` spells; None without copying."""
        if self.copy_gate is None or self.reader is None:
            return None
        names = self.reader.names[:READ_ROWS]
        probs = [reader_logits[name].float().softmax(-1) for name in names]
        widest = max(p.shape[-1] for p in probs)
        return torch.stack([nn.functional.pad(p, (0, widest - p.shape[-1])) for p in probs], 1)

    def spell(self, probs: torch.Tensor, written: tuple[int, ...], lm: torch.Tensor) -> torch.Tensor:
        """(READ_ROWS, vocab): per reading attribute, its next answer token after ``written`` (the answer's tokens
        so far) as the reader read it (``probs``, one image's ``words``): the classes whose word's first tokens are
        the ones written since the word's start, weighed by their probability, each on its word's next token (or
        on ``</answer>`` where the word is complete). Where no class fits (or before the word starts), the LM
        head's distribution ``lm``, so the gate's mixture stays a distribution."""
        rows = []
        end = self.config.answer_ids[1]
        for j, (start, classes) in enumerate(self.spelled):
            since = () if start is None else written[start:]  # the word's tokens written so far
            m = len(since)
            tokens, which = [], []
            if start is None or len(written) >= start:
                for c, word in classes:
                    if len(word) >= m and tuple(word[:m]) == since:
                        tokens.append(word[m] if m < len(word) else end)
                        which.append(c)
            if not which:
                rows.append(lm)
                continue
            p = probs[j, which]
            p = p / p.sum().clamp(min=1e-9)
            rows.append(torch.zeros_like(lm).index_add(0, torch.tensor(tokens, device=lm.device), p))
        return torch.stack(rows)

    def _relate(
        self,
        state: PointerState,
        in_answer: list[tuple[int, ...] | None],
        boxes: list[list[int] | None],
        images: list[int],
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        logits_to_keep: int | torch.Tensor,
    ) -> torch.Tensor:
        """For rows whose question names two codes (with ``found_prefix``, one: ``Found`` only), add through the LM
        head: at an answer's first token, ``Relation``'s shift (``relation``); at every other position outside
        answers and zooms after an observation, ``Found``'s (``named_seen``); each from the images before that
        position (``in_answer`` and ``boxes``: each row's answer and zoom open when this pass began; ``images``: its
        images after it)."""
        if (self.relation is None and self.found is None) or not isinstance(logits_to_keep, int):
            return logits
        first_kept = input_ids.shape[1] - logits.shape[1]
        image = self.config.image_token_id
        where: dict[str, tuple[list[int], list[int], list[torch.Tensor]]] = {
            "relation": ([], [], []),
            "found": ([], [], []),
        }
        for b, seq in enumerate(input_ids.tolist()):
            codes = question_codes(state.words[b] or [], self._chars, len(self._char_rows))
            if len(codes) < (1 if self.config.found_prefix else 2):
                continue
            reads, places = state.reads[b], state.places[b]
            seen = images[b] - sum(map(state.starts_image, seq, [None, *seq[:-1]]))  # images before this pass
            w, written, previous = in_answer[b], boxes[b], None
            known: dict[tuple[str, int], torch.Tensor | None] = {}
            for t, token in enumerate(seq):
                seen += state.starts_image(token, previous)
                previous = token
                w = state.answer_step(w, token)
                written, done = state.box_step(written, token)
                if t < first_kept or seen < 2 or token == image:
                    continue
                if w == () and self.relation is not None:
                    name, measure = "relation", relation
                elif w is None and written is None and done is None and self.found is not None:
                    name, measure = "found", partial(named_seen, prefix=self.config.found_prefix)
                else:
                    continue
                if (name, seen) not in known:
                    known[name, seen] = measure(codes, reads[:seen], places[:seen], self._char_rows, self._empty)
                value = known[name, seen]
                if value is not None:
                    where[name][0].append(b)
                    where[name][1].append(t - first_kept)
                    where[name][2].append(value)
        for name, (bs, ts, values) in where.items():
            if values:
                index = (torch.tensor(bs, device=logits.device), torch.tensor(ts, device=logits.device))
                head = self.relation if name == "relation" else self.found
                shift = self.lm_head(head(torch.stack(values).detach().to(logits.dtype)))
                logits = logits.index_put(index, logits[index] + shift.to(logits.dtype))
        return logits

    def _copy(
        self,
        state: PointerState,
        in_answer: list[tuple[int, ...] | None],
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        logits_to_keep: int | torch.Tensor,
    ) -> torch.Tensor:
        """Inside an answer, each next token is a mixture: the LM head's distribution and the words the reader
        read in the row's last image, one per reading attribute (``spell``), weighted by a gate on the decoder's
        state and the answer position (``copy_gate``, ``copy_step``); the logits become the mixture's log. So an
        answer can spell what the reader read without the decoder having to learn to copy it."""
        first_kept = input_ids.shape[1] - logits.shape[1]
        where_b, where_t, written = [], [], []
        for b, seq in enumerate(input_ids.tolist()):
            w = in_answer[b]
            for t, token in enumerate(seq):
                w = state.answer_step(w, token)
                if w is not None and t >= first_kept and state.reads[b]:
                    where_b.append(b)
                    where_t.append(t)
                    written.append(w)
            state.in_answer[b] = w
        if not where_b or not isinstance(logits_to_keep, int):
            return logits
        dev = logits.device
        bi, ti = torch.tensor(where_b, device=dev), torch.tensor(where_t, device=dev)
        ks = torch.tensor([min(len(w), COPY_STEPS - 1) for w in written], device=dev)
        gate = self.copy_gate(hidden[bi, ti]) + self.copy_step(ks)
        if self.asked_copy is not None:  # at an answer's first token: what the question asks for (``AskedCopy``)
            votes = [
                self.asked_copy(torch.tensor(state.words[b], device=dev)) if not w and state.words[b] else None
                for b, w in zip(where_b, written, strict=True)
            ]
            if any(v is not None for v in votes):
                gate = gate + torch.stack([v if v is not None else gate.new_zeros(gate.shape[-1]) for v in votes])
        gate = gate.float().softmax(-1)
        lm = logits[bi, ti - first_kept].float().softmax(-1)
        reads = torch.stack(
            [self.spell(state.reads[b][-1], w, lm[i]) for i, (b, w) in enumerate(zip(where_b, written, strict=True))]
        )  # (n, READ_ROWS, vocab)
        mixed = gate[:, -1:] * lm + (gate[:, :-1, None] * reads).sum(1)
        return logits.index_put((bi, ti - first_kept), mixed.clamp(min=1e-9).log().to(logits.dtype))

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
        close = self.config.box_close_id
        vocab = logits.shape[-1]
        where_b, where_t, rows = [], [], []
        for b, seq in enumerate(input_ids.tolist()):
            written = state.open_box[b]
            previous = None
            for t, token in enumerate(seq):
                if state.starts_image(token, previous):
                    state.pending[b] = None  # an image follows the zoom: it is that zoom's observation
                previous = token
                written, done = state.box_step(written, token)
                if done is not None:
                    state.zoomed[b].append(done)
                    state.pending[b] = done
                    if close is not None and t >= first_kept:  # the box is complete: only its closing tag may follow
                        where_b.append(b)
                        where_t.append(t - first_kept)
                        only = torch.full((vocab,), NEG, device=logits.device)
                        only[close] = 0.0
                        rows.append(only)
                if written is None or t < first_kept or not state.keys[b]:
                    continue
                row = self._pointer_row(state, b, hidden[b, t], written, vocab)
                if row is not None:
                    where_b.append(b)
                    where_t.append(t - first_kept)
                    rows.append(row)
            state.open_box[b] = written
        if not rows:
            return logits
        index = (torch.tensor(where_b, device=logits.device), torch.tensor(where_t, device=logits.device))
        return logits.index_put(index, torch.stack(rows).to(logits.dtype))

    def pointer_scores(self, keys: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The pointer's score of each region (``keys``, as ``PointerState`` keeps them) from the decoder's state
        ``h`` where it points."""
        query = self.query(h)
        if self.grounding is not None:  # the keys' last value is the grounding match: weigh it at full scale
            query = torch.cat([query, self.grounding.weight(h) * self.config.pointer_dim**0.5], -1)
        return (keys @ query).float() / self.config.pointer_dim**0.5

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
        if self.config.no_repeat_zooms and state.zoomed[b]:
            done = torch.tensor(state.zoomed[b], device=spells.device)
            fresh = ~(spells[:, None, :] == done[None]).all(-1).any(1)
            if bool(fresh.any()):  # where every region left was zoomed into already, the pointer may repeat one
                keys, spells = keys[fresh], spells[fresh]
        scores = self.pointer_scores(keys, h)
        top = scores.max()
        mass = torch.zeros(vocab, device=h.device).index_add(0, spells[:, j], (scores - top).exp())
        return torch.where(mass > 0, mass.clamp(min=1e-30).log() + top, torch.full_like(mass, NEG))


def code_characters(
    config: GlimpseVLConfig, spelled: list[tuple[int | None, list[tuple[int, list[int]]]]]
) -> tuple[dict[int, int], list[int], int]:
    """What ``Relation`` reads a question's codes with: the token writing each code character → its class, the
    reading attributes of a code's characters in order (``char1`` …), and the class of the empty character (a
    code ended); empty where the reader reads no code characters or its attributes' classes differ."""
    names = [name for name, _ in config.reader_classes][: len(spelled)]
    rows = [j for j, name in enumerate(names) if name.startswith("char")]
    if not rows or any(spelled[j][1] != spelled[rows[0]][1] for j in rows):
        return {}, [], -1
    chars = {token: c for c, ids in enumerate(config.code_tokens) for token in ids}
    empty = next((c for c, ids in spelled[rows[0]][1] if not ids), -1)
    return (chars, rows, empty) if empty >= 0 and chars else ({}, [], -1)


def code_tokens(tokenizer: Any, classes: list[list[Any]]) -> list[list[int]]:
    """Per class of a code's first character (of ``reader_vocabulary``'s ``classes``), the ids of the tokens that
    write it: the character alone and after a space (``GlimpseVLConfig.code_tokens``); none for the empty class."""
    words = dict((name, list(w)) for name, w in classes).get("char1", [])
    out = []
    for word in words:
        ids: list[int] = []
        for text in (word, " " + word):
            if not word:
                break
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        out.append(ids)
    return out


def answer_words(config: GlimpseVLConfig) -> list[tuple[int | None, list[tuple[int, list[int]]]]]:
    """Per reading attribute, where its word starts in an answer (None: at every answer step) and its classes'
    words as ``(class, token ids)`` (none for an attribute that is not an answer word), from the config's
    ``reader_spellings`` and ``reader_starts``, or for a checkpoint made before them from ``reader_ids``: each
    class's first token, at every step (``</answer>``: the empty word)."""
    if config.reader_spellings:
        return [
            (start, list(enumerate(row)))
            for start, row in zip(config.reader_starts, config.reader_spellings[:READ_ROWS], strict=False)
        ]
    end = config.answer_ids[1]
    return [
        (None, [(c, [] if i == end else [i]) for c, i in enumerate(row) if i >= 0])
        for row in config.reader_ids[:READ_ROWS]
    ]


def register() -> None:
    """Register the built-in model with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GlimpseVLConfig, exist_ok=True)
    AutoModelForImageTextToText.register(GlimpseVLConfig, GlimpseVLForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(GlimpseVLConfig, slow_image_processor_class=GlimpseVLImageProcessor, exist_ok=True)
    AutoProcessor.register(GlimpseVLConfig, GlimpseVLProcessor, exist_ok=True)


register()


SIZES: dict[str, dict[str, Any]] = {
    # decoder: hidden, layers, heads, kv heads, MLP; region encoder: channels of its four stages; grounding width
    "base": {"hidden": 256, "layers": 4, "heads": 4, "kv": 2, "mlp": 768, "channels": (24, 48, 96, 128), "ground": 64},
    "tiny": {"hidden": 64, "layers": 2, "heads": 2, "kv": 1, "mlp": 128, "channels": (8, 8, 16, 16), "ground": 16},
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
    from glimpse.probes.synth import KINDS, SEARCH_KINDS, make_probe
    from glimpse.protocol.prompts import DEFAULT_PROMPTS

    texts = [p.system + p.user + p.observation + p.error + p.code for p in DEFAULT_PROMPTS.values()] * 4
    for level in ("easy", "medium", "hard"):
        for i in range(per_level):
            for kind in KINDS + SEARCH_KINDS:  # the search kinds' wording too ("starts", "whole", "exactly")
                rec = make_probe(level, 5_000_000 + i, seed=seed, kind=kind, render=False).record
                texts.append(rec["problem"].replace("<image>", "") + " " + str(rec["solution"]).lower())
    return texts


def reader_vocabulary(tokenizer: Any) -> tuple[list[list[Any]], list[list[int]]]:
    """The reader's attributes and classes (read from the generator's vocabulary of what a sign shows: a reader
    for other panels would list its own) and, per reading token, the id of the token each class's answer word
    starts with (the word ``""``, nothing written there, ends the answer: ``</answer>``; -1 where the class is
    not an answer word)."""
    from glimpse.probes.stream import sign_vocabulary

    classes = sign_vocabulary()
    ids = []
    for name in list(classes)[:READ_ROWS]:
        row = []
        for word in classes[name]:
            if not name.startswith(ANSWER_WORDS):
                row.append(-1)
            elif word == "":
                row.append(tokenizer.convert_tokens_to_ids("</answer>"))
            else:
                row.append(tokenizer.encode(word, add_special_tokens=False)[0])
        ids.append(row)
    return [[name, words] for name, words in classes.items()], ids


def reader_spellings(tokenizer: Any, classes: list[list[Any]]) -> tuple[list[list[list[int]]], list[int]]:
    """Per reading token's attribute (of ``reader_vocabulary``'s ``classes``), each class's answer word as token ids
    (none for an attribute that is not an answer word) and the answer token the word starts at: a code's
    characters (``char1`` …) one token each, in order; a word at the answer's start."""
    spellings, starts = [], []
    for name, words in classes[:READ_ROWS]:
        answer = name.startswith(ANSWER_WORDS)
        spellings.append([tokenizer.encode(w, add_special_tokens=False) if w else [] for w in words] if answer else [])
        starts.append(int(name[4:]) - 1 if name.startswith("char") else 0)
    return spellings, starts


def spell_codes(folder: Any) -> bool:
    """Give a checkpoint made before answers spelled whole words (``reader_spellings``) its spellings, its
    tokenizer made to write a code one character per token first (``CODE_APART``: the merged tokens stay in the
    vocabulary, unused). Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor
    from glimpse.hf.tiny import drop_merges

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("reader_spellings") or not config.get("reader_classes"):
        return False
    tok_path = Path(folder) / "tokenizer.json"
    dropped = drop_merges(json.loads(tok_path.read_text()), CODE_APART)
    tok_path.write_text(json.dumps(dropped, ensure_ascii=False, indent=2))
    spellings, starts = reader_spellings(load_processor(folder).tokenizer, config["reader_classes"])
    config.update(reader_spellings=spellings, reader_starts=starts)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def close_zooms(folder: Any) -> bool:
    """Have a checkpoint made before them close its zooms itself (``box_close_id``) and never repeat one
    (``no_repeat_zooms``); no weight changes. Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("box_close_id") is not None or not config.get("coordinate_ids"):
        return False
    close = load_processor(folder).tokenizer.convert_tokens_to_ids(BOX_CLOSE)
    config.update(box_close_id=close, no_repeat_zooms=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def region_vocabulary(tokenizer: Any) -> tuple[list[list[Any]], list[list[list[int]]]]:
    """The region heads' attributes and classes (the teacher's ``REGION_ATTRIBUTES`` of the generator's vocabulary
    of what a sign shows) and, per class, the token ids of its words (none for the class "none")."""
    from glimpse.builtin.teacher import REGION_ATTRIBUTES
    from glimpse.probes.stream import sign_vocabulary

    vocab = sign_vocabulary()
    classes = [[name, vocab[name]] for name in REGION_ATTRIBUTES]
    ids = [[tokenizer.encode(word, add_special_tokens=False) if word else [] for word in words] for _, words in classes]
    return classes, ids


def add_reader(folder: Any) -> bool:
    """Give a checkpoint made before the reader existed one, and one made before answers could copy what it read
    that copying (its config gains what is missing; the new weights start fresh when the checkpoint is next
    loaded). Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("reader_classes") and config.get("answer_ids"):
        return False
    tokenizer = load_processor(folder).tokenizer
    if not config.get("reader_classes"):
        classes, ids = reader_vocabulary(tokenizer)
        config.update(reader_classes=classes, reader_ids=ids, reader_channels=[32, 64, 96])
    config["answer_ids"] = [tokenizer.convert_tokens_to_ids(t) for t in ("<answer>", "</answer>")]
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def add_grounding(folder: Any, dim: int = SIZES["base"]["ground"]) -> bool:
    """Give a checkpoint made before ``Grounding`` existed one of width ``dim`` (its config gains it; the new
    weights start switched off when the checkpoint is next loaded, so its behaviour is unchanged until trained).
    Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("ground_dim") and config.get("turn_start_id") is not None:
        return False
    start = load_processor(folder).tokenizer.convert_tokens_to_ids("<|im_start|>")
    config.update(ground_dim=dim, turn_start_id=start)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def _rebuild(folder: Any, config: dict[str, Any], start: Any = None) -> None:
    """Write the checkpoint in ``folder`` back with ``config``: every weight it had whose shape still fits is
    kept, the rest start fresh (``start(model)`` may set them), all written, so loading finds none missing and
    initialises nothing it already had."""
    from pathlib import Path

    from safetensors.torch import load_file

    from glimpse.hf.processor import quiet_progress

    model = GlimpseVLForConditionalGeneration(GlimpseVLConfig.from_dict(config))
    if (Path(folder) / "generation_config.json").exists():  # its decoding defaults (greedy) stay as they were
        model.generation_config = GenerationConfig.from_pretrained(folder)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    old: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        old.update(load_file(f))
    model.load_state_dict({k: v for k, v in old.items() if shapes.get(k) == v.shape}, strict=False)
    if start is not None:
        start(model)
    quiet_progress()
    model.save_pretrained(folder)


def add_line_reader(folder: Any) -> bool:
    """Make a checkpoint's reader read a code's characters from the panel's line of text (``reader_line``): the
    line's conv stages and the characters' classifiers start fresh; every other weight is kept. Returns whether
    anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    if not config.get("reader_classes") or config.get("reader_line"):
        return False
    _rebuild(folder, {**config, "reader_line": True})
    return True


def add_blob_counter(folder: Any) -> bool:
    """Give a checkpoint's reader a ``BlobCounter`` (``reader_blobs``) whose last layer starts at zero, so it reads
    exactly as before until trained; every other weight is kept. Returns whether anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    names = [name for name, _ in config.get("reader_classes") or []]
    if "dots" not in names or config.get("reader_blobs"):
        return False

    def silent(model: GlimpseVLForConditionalGeneration) -> None:
        last = model.reader.counter.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    _rebuild(folder, {**config, "reader_blobs": True}, silent)
    return True


def add_relation(folder: Any) -> bool:
    """Give a checkpoint that copies answers a ``Relation`` (``relate``) whose direction starts at zero, so it
    answers exactly as before until trained; every other weight is kept. Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor

    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("relate") or not config.get("reader_classes") or len(config.get("answer_ids") or []) != 2:
        return False
    chars = code_tokens(load_processor(folder).tokenizer, config["reader_classes"])
    _rebuild(folder, {**config, "relate": True, "code_tokens": chars})
    return True


def add_asked_copy(folder: Any) -> bool:
    """Give a checkpoint that copies answers an ``AskedCopy`` (``asked_copy``) whose votes start at zero, so it
    answers exactly as before until trained; every other weight is kept. Returns whether anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("asked_copy") or not config.get("reader_classes") or len(config.get("answer_ids") or []) != 2:
        return False
    _rebuild(folder, {**config, "asked_copy": True})
    return True


def add_ink_colour(folder: Any) -> bool:
    """Give a checkpoint's reader an ``InkColour`` (``reader_colours``) that starts at zero, so it reads exactly as
    before until trained; every other weight is kept. Returns whether anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    names = [name for name, _ in config.get("reader_classes") or []]
    if "marker_color" not in names or config.get("reader_colours"):
        return False
    _rebuild(folder, {**config, "reader_colours": True})
    return True


def add_found(folder: Any) -> bool:
    """Give a checkpoint with a ``Relation`` a ``Found`` (``found``) that starts at zero, so it behaves exactly as
    before until trained; every other weight is kept. Returns whether anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("found") or not config.get("relate"):
        return False
    _rebuild(folder, {**config, "found": True})
    return True


def find_prefixes(folder: Any) -> bool:
    """Let a checkpoint's ``Found`` hear a question that names one code as the start of a code (``found_prefix``);
    questions that name two codes are heard as before. Returns whether anything changed."""
    import json
    from pathlib import Path

    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("found_prefix") or not config.get("found"):
        return False
    _rebuild(folder, {**config, "found_prefix": True})
    return True


def add_region_heads(folder: Any) -> bool:
    """Give a checkpoint made before ``RegionHeads`` and ``RingProjection`` existed both (its config gains them;
    their weights start fresh when it is next loaded: the ring projection at zero, and the heads change only the
    grounding's match, whose ``seen`` projection starts at zero, so behaviour is unchanged until trained).
    Returns whether anything changed."""
    import json
    from pathlib import Path

    from glimpse.hf.processor import load_processor

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("region_classes") and config.get("ring_colour"):
        return False
    if not config.get("region_classes"):
        classes, ids = region_vocabulary(load_processor(folder).tokenizer)
        config.update(region_classes=classes, region_word_ids=ids)
    config["ring_colour"] = True
    path.write_text(json.dumps(config, indent=2) + "\n")
    return True


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

    from glimpse.hf.processor import load_processor, quiet_progress
    from glimpse.hf.tiny import CHAT_TEMPLATE, build_tokenizer

    spec = SIZES[size]
    tokenizer = build_tokenizer(
        1200, seed, texts=tokenizer_corpus(seed), extra_tokens=tuple(location_tokens()), apart=CODE_APART
    )
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
    reader_classes, reader_ids = reader_vocabulary(tokenizer)
    spellings, starts = reader_spellings(tokenizer, reader_classes)
    region_classes, region_word_ids = region_vocabulary(tokenizer)
    config = GlimpseVLConfig(
        text_config=text,
        channels=spec["channels"],
        image_token_id=ids("<|image_pad|>"),
        box_open_id=ids(BOX_OPEN),
        box_close_id=ids(BOX_CLOSE),
        no_repeat_zooms=True,
        coordinate_ids=[ids(t) for t in coordinates],
        source_ids=[ids(source_text(i)) for i in range(MAX_SOURCES + 1)],
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        reader_classes=reader_classes,
        reader_ids=reader_ids,
        reader_spellings=spellings,
        reader_starts=starts,
        answer_ids=[ids("<answer>"), ids("</answer>")],
        ground_dim=spec["ground"],
        turn_start_id=ids("<|im_start|>"),
        region_classes=region_classes,
        region_word_ids=region_word_ids,
        ring_colour=True,
        reader_line=True,
        reader_blobs=True,
        relate=True,
        reader_colours=True,
        found=True,
        found_prefix=True,
        asked_copy=True,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    out = Path(out_dir)
    quiet_progress()
    image_processor = GlimpseVLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    GlimpseVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    # as the saved tokenizer writes a question (loaded, it splits text before digits as Qwen's does)
    config.save_pretrained(out)
    config.code_tokens = code_tokens(load_processor(out).tokenizer, reader_classes)
    torch.manual_seed(seed)
    model = GlimpseVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    (out / PROMPT_FILE).write_text(PROMPTS, encoding="utf-8")
    return out
