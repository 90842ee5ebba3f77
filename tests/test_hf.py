"""The hf backend on tiny random checkpoints of the real architectures: processor loading without torchvision,
each family's native conventions, the token view checked token by token against the chat template, batching,
stop strings, the KV cache across turns (the same outputs as recomputing, on Qwen2.5-VL and the built-in model),
and ``glimpse serve`` over loopback driven by the openai backend."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from conftest import glimpse_server, gradient_image
from glimpse.agent import AgentLoop
from glimpse.builtin.model import build_builtin
from glimpse.errors import ConfigError
from glimpse.hf.processor import load_processor, model_type
from glimpse.hf.tiny import build_tiny_qwen
from glimpse.images import image_tokens
from glimpse.models import load_backend
from glimpse.models.base import GenerateParams, ImagePart, Message, TextPart
from glimpse.models.hf import HFBackend, _Prefix, _Request, special_token_escaper, to_hf
from glimpse.models.kv_cache import KVCache, image_starts
from glimpse.train.common import hf_chat, image_runs, render_images
from glimpse.trajectory import Sample, load_jsonl

SMALL = {"min_pixels": 20_000, "max_pixels": 120_000}  # a few hundred image tokens: fast on CPU


@pytest.fixture(scope="module")
def backend(tiny_qwen) -> HFBackend:
    return HFBackend(str(tiny_qwen), max_batch=8)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    """The built-in model's current architecture, randomly initialised."""
    return build_builtin(tmp_path_factory.mktemp("builtin") / "model", size="tiny")


def test_processor_loads_without_torchvision_and_saves_the_stock_class(tiny_qwen, tmp_path):
    processor = load_processor(tiny_qwen)
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == "ImageOnlyQwen2_5_VLProcessor"
    assert processor.image_processor is not None and processor.chat_template
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # what real checkpoints have, for AutoProcessor
    again = load_processor(tmp_path) if (tmp_path / "config.json").exists() else None
    assert again is None  # a processor folder without config.json is not a checkpoint


def test_model_type_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        model_type(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="'llava' is not supported; supported: qwen2_vl"):
        model_type(tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        load_backend(f"hf:{tmp_path / 'missing'}")


@pytest.mark.parametrize(
    ("family", "coords", "factor"),
    [("qwen2_5_vl", "pixels", 28), ("qwen2_vl", "thousand", 28), ("qwen3_vl", "relative", 32)],
)
def test_each_family_runs_with_its_native_box_convention(family, coords, factor, tmp_path):
    folder = build_tiny_qwen(tmp_path / family, family=family)
    backend = load_backend(f"hf:{folder}")
    assert (backend.family, backend.default_coords, backend.resize_factor) == (family, coords, factor)
    loop = AgentLoop(backend, max_turns=1, max_new_tokens=4, temperature=0, **SMALL)
    assert loop.settings.coords == coords and loop.settings.resize_factor == factor
    path = tmp_path / "img.png"
    gradient_image(700, 500).save(path)
    (traj,) = asyncio.run(loop.run(Sample(id="s", images=[str(path)], question="What is it?")))
    shown = traj.observations()[0].shown_size
    assert shown[0] % factor == 0 and shown[1] % factor == 0
    assert traj.turns and traj.usage.prompt_tokens > 0
    # The user's explicit choice wins over the family default.
    assert AgentLoop(backend, coords="relative").settings.coords == "relative"


def _segments(full: str, traj) -> list[str]:
    """The template text between the model's replies: what the harness injected before each reply."""
    out, pos = [], 0
    header = "<|im_start|>assistant\n"
    for turn in traj.turns:
        start = full.index(header + turn.text, pos) + len(header)
        out.append(full[pos:start])
        pos = start + len(turn.text)
        if turn.finish_reason == "stop" and full.startswith("<|im_end|>", pos):
            pos += len("<|im_end|>")  # sampled: the model ended its turn itself
    return out


def test_token_view_matches_the_chat_template_token_by_token(backend, tmp_path):
    path = tmp_path / "img.png"
    gradient_image(900, 640).save(path)
    # Sampled at temperature 1, a random model writes token sequences a tokenizer would never produce from text:
    # the view must keep the sampled ids, not a re-tokenisation of the reply.
    loop = AgentLoop(backend, max_turns=3, max_new_tokens=24, temperature=1.0, seed=3, return_token_ids=True, **SMALL)
    (traj,) = asyncio.run(loop.run(Sample(id="s", images=[str(path)], question="What is written on it?")))
    assert len(traj.turns) == 3
    _check_view(backend, traj)


def _check_view(backend: HFBackend, traj) -> None:
    """The trajectory's token view, token by token: each sampled run is a reply, and each injected run is exactly
    what the template and processor make of that stretch of the conversation, its images included."""
    assert traj.token_view is not None and traj.token_view.aligned
    ids, mask = traj.token_view.ids, traj.token_view.mask

    # Split the view into runs of injected (0) and sampled (1) tokens.
    runs: list[tuple[int, list[int]]] = []
    for i, m in zip(ids, mask, strict=True):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(i)
        else:
            runs.append((m, [i]))
    sampled = [r for m, r in runs if m == 1]
    injected = [r for m, r in runs if m == 0]
    # the prompt, then after each reply but the last, what was injected
    assert len(sampled) == len(injected) == len(traj.turns)
    processor = backend.processor
    for turn, tokens in zip(traj.turns, sampled, strict=True):
        text = processor.tokenizer.decode(tokens, skip_special_tokens=False)
        assert text == turn.text + ("<|im_end|>" if turn.finish_reason == "stop" else "")

    # Every injected run is exactly what the template and processor make of that stretch of the conversation.
    messages, order = hf_chat(traj)
    full = processor.apply_chat_template(messages, tokenize=False)
    images = render_images(traj, order)
    for segment, tokens in zip(_segments(full, traj), injected, strict=True):
        n = segment.count("<|image_pad|>")
        taken, images = images[:n], images[n:]
        enc = processor(text=[segment], images=taken or None, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == tokens


def test_two_images_in_one_question_each_at_its_own_tokens(backend, tmp_path):
    """A two-image question through the loop and the hf backend: both originals in the first user turn, each
    under its name, its run of image tokens as long as its shown size implies, in order (the two differ in
    size), and the whole token view what the template and processor make of the conversation."""
    gradient_image(900, 640).save(tmp_path / "a.png")
    gradient_image(420, 700).transpose(0).save(tmp_path / "b.png")
    sample = Sample(id="two", images=[str(tmp_path / "a.png"), str(tmp_path / "b.png")], question="Which is wider?")
    loop = AgentLoop(backend, max_turns=2, max_new_tokens=16, temperature=1.0, seed=4, return_token_ids=True, **SMALL)
    (traj,) = asyncio.run(loop.run(sample))
    _check_view(backend, traj)
    shown = [o.shown_size for o in traj.originals()]
    assert len(shown) == 2 and shown[0] != shown[1] and sum(w * h for w, h in shown) <= SMALL["max_pixels"]
    ids = traj.token_view.ids
    runs = image_runs(ids, backend.image_token_id)
    assert [r.length for r in runs[:2]] == [image_tokens(*size, backend.resize_factor) for size in shown]
    for k, run in enumerate(runs[:2], 1):
        assert backend.tokenizer.decode(ids[: run.start]).endswith(f"image_{k}:\n<|vision_start|>")


def test_concurrent_requests_are_batched_and_match_running_alone(backend):
    def conversation(k: int) -> list[Message]:
        image = gradient_image(28 * (6 + 3 * k), 28 * (5 + k))
        return [Message("system", "You answer."), Message("user", [ImagePart(image=image), TextPart("Q" * (k + 1))])]

    params = GenerateParams(max_new_tokens=10, temperature=0)
    alone = [asyncio.run(backend.generate(conversation(k), params))[0].token_ids for k in range(4)]
    backend.batch_sizes.clear()

    async def together():
        return await asyncio.gather(*(backend.generate(conversation(k), params) for k in range(4)))

    batched = [r[0].token_ids for r in asyncio.run(together())]
    assert batched == alone  # left padding and rotary positions are handled right
    assert max(backend.batch_sizes) > 1


def test_n_samples_and_seeds(backend):
    messages = [Message("user", [ImagePart(image=gradient_image(280, 224)), TextPart("What?")])]
    params = GenerateParams(n=3, max_new_tokens=8, temperature=1.0, seed=7)
    first = asyncio.run(backend.generate(messages, params))
    again = asyncio.run(backend.generate(messages, params))
    assert len(first) == 3
    assert [c.token_ids for c in first] == [c.token_ids for c in again]  # a seed makes sampling reproducible


def _request(backend: HFBackend, text: str = "") -> _Request:
    loop = asyncio.new_event_loop()
    try:
        return _Request(text, _Prefix(ids=[1, 2, 3]), GenerateParams(), loop.create_future())
    finally:
        loop.close()


def test_stop_strings_cut_the_reply_at_their_end(backend):
    tok = backend.tokenizer
    reply = '<think>look</think><grounding>{"bbox_2d": [1, 2, 3, 4]}</grounding> and more text'
    row = tok.encode(reply, add_special_tokens=False) + [tok.pad_token_id] * 3
    params = GenerateParams(stop=["</grounding>"])
    c = backend._completion(_request(backend), row, params)
    assert c.text.endswith("</grounding>") and "more" not in c.text
    assert tok.decode(c.token_ids) == c.text and c.finish_reason == "stop"

    ended = [*tok.encode("<answer>7</answer>", add_special_tokens=False), tok.eos_token_id, tok.pad_token_id]
    c = backend._completion(_request(backend), ended, GenerateParams(stop=["</grounding>"]))
    assert c.text == "<answer>7</answer>" and c.token_ids[-1] == tok.eos_token_id and c.finish_reason == "stop"

    cut = tok.encode("<think>a long thought that", add_special_tokens=False)
    c = backend._completion(_request(backend), cut, params)
    assert c.finish_reason == "length" and c.token_ids == cut


def test_tool_calls_are_parsed_for_the_tools_protocol(backend):
    tok = backend.tokenizer
    reply = 'Zooming.<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</tool_call>'
    row = [*tok.encode(reply, add_special_tokens=False), tok.eos_token_id]
    tools = [{"type": "function", "function": {"name": "zoom_in", "parameters": {}}}]
    c = backend._completion(_request(backend), row, GenerateParams(tools=tools))
    assert c.finish_reason == "tool_calls" and c.text == "Zooming."
    assert c.tool_calls[0].name == "zoom_in" and json.loads(c.tool_calls[0].arguments) == {"bbox_2d": [1, 2, 3, 4]}


def test_glimpse_serve_hf_end_to_end_with_the_openai_backend(tiny_qwen, tmp_path):
    path = tmp_path / "img.png"
    gradient_image(800, 600).save(path)
    out = tmp_path / "t.jsonl"
    with glimpse_server("--model", f"hf:{tiny_qwen}", "--max-n", "4", "--max-new-tokens", "64") as base:
        proc = subprocess.run(
            [sys.executable, "-m", "glimpse", "ask", str(path), "What is it?", "--model", "openai:tiny",
             "--base-url", base, "--max-turns", "2", "--max-new-tokens", "16", "--min-pixels", "20000",
             "--max-pixels", "120000", "--temperature", "0", "--token-ids", "--save", str(out)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr  # a random model rarely answers; it must not crash
        (traj,) = load_jsonl(out)
        assert len(traj.turns) == 2 and traj.usage.prompt_tokens > 0 and traj.usage.completion_tokens > 0
        assert traj.token_view is not None and traj.token_view.aligned and sum(traj.token_view.mask) > 0
        # The client resent turn 1 with turn 2: the server reused its past key/values.
        kv = httpx.get(base.removesuffix("/v1") + "/health", timeout=30).json()["kv_cache"]
        assert kv["hits"] >= 1 and kv["reused_tokens"] > kv["computed_tokens"] / 2 and kv["entries"] >= 1
        # Limits are refused with a clear 4xx.
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 9}
        r = httpx.post(f"{base}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and "above this server's limit of 4" in r.json()["error"]["message"]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2}
        r = httpx.post(f"{base}/chat/completions", json=body, timeout=60).json()
        assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] <= 8 and r["usage"]["prompt_tokens"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The KV cache across turns


def _start(k: int) -> list[Message]:
    image = gradient_image(28 * (8 + 2 * k), 28 * (6 + k))
    return [Message("system", "You answer."), Message("user", [ImagePart(image=image), TextPart("Q" * (k + 1))])]


def _converse(backend: HFBackend, conversations: list[list[Message]], turns: int, params) -> list[list[list[int]]]:
    """Run the conversations concurrently turn by turn; after each reply the harness adds a new image. Returns the
    sampled ids per turn and conversation (``params(turn)`` gives each turn's settings)."""
    out = []

    async def one_turn(p: GenerateParams) -> list:
        return await asyncio.gather(*(backend.generate(m, p) for m in conversations))

    for t in range(turns):
        replies = asyncio.run(one_turn(params(t)))
        out.append([[c.token_ids for c in r] for r in replies])
        for k, (messages, r) in enumerate(zip(conversations, replies, strict=True)):
            view = gradient_image(28 * (4 + t + k), 28 * (5 + t)).transpose(0)  # each view differs
            messages.append(Message("assistant", r[0].text))
            messages.append(Message("user", [TextPart(f"Observation {t + 1}:"), ImagePart(image=view)]))
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_kv_cache_reuses_past_turns_with_the_same_greedy_outputs(family, tiny_qwen, tmp_path):
    folder = str(tiny_qwen if family == "qwen2_5_vl" else build_tiny_qwen(tmp_path / family, family=family))
    cached, plain = HFBackend(folder, kv_cache_gb=1), HFBackend(folder, kv_cache_gb=0)
    greedy = lambda t: GenerateParams(max_new_tokens=10, temperature=0, seed=t)  # noqa: E731 (greedy batches)
    with_cache = _converse(cached, [_start(k) for k in range(3)], 4, greedy)
    assert with_cache == _converse(plain, [_start(k) for k in range(3)], 4, greedy)  # token for token
    stats = cached.kv_cache.stats
    assert stats["hits"] >= 9 and stats["reused_tokens"] > stats["computed_tokens"]  # turns 2-4 run what was added
    assert max(cached.batch_sizes) > 1  # rows with cached prefixes of different lengths were decoded together
    assert len(cached.kv_cache.entries) == 3  # one per conversation: each turn replaced the entry it extended


def _zooming(backend: HFBackend) -> HFBackend:
    """The built-in model with its language-model head biased to open a zoom whenever it writes: every other token
    is then the pointer's (a region of one of the images so far, and that image's source), so the replies show
    whether the pointer's state (region keys, images seen) came through the turns."""
    model = backend.model
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[model.config.box_open_id] = 1e3
    model.lm_head = head
    return backend


def test_the_builtin_model_reuses_past_turns_and_points_as_when_computed_whole(builtin):
    """The built-in model's pointer state goes with each conversation's key/values and comes back per batch row:
    greedy replies (the pointer's zooms) token for token those of recomputing, batched rows kept apart, and the
    ``n`` seeded samples of one prompt, which share its kept prefix, drawn alike."""
    cached = _zooming(HFBackend(str(builtin), kv_cache_gb=1))
    plain = _zooming(HFBackend(str(builtin), kv_cache_gb=0))
    greedy = lambda t: GenerateParams(max_new_tokens=12, temperature=0)  # noqa: E731
    conversations = [_start(k) for k in range(3)]
    assert _converse(cached, conversations, 4, greedy) == _converse(plain, [_start(k) for k in range(3)], 4, greedy)
    replies = [m.content for m in conversations[0] if m.role == "assistant"]
    assert all(r.startswith('{"bbox_2d": [') and '"source": "' in r for r in replies)  # the pointer wrote them
    stats = cached.kv_cache.stats
    assert stats["hits"] >= 9 and stats["reused_tokens"] > stats["computed_tokens"]
    assert max(cached.batch_sizes) > 1 and len(cached.kv_cache.entries) == 3
    assert all(e.state is not None and e.state.images == [4] for e in cached.kv_cache.entries.values())


@pytest.mark.parametrize("kv_cache_gb", [1, 0])
def test_the_builtin_models_n_samples_have_the_log_probs_of_each_sample_computed_alone(builtin, kv_cache_gb):
    """The ``n`` seeded samples of one prompt on a third turn, continued from kept key/values (or computed whole):
    every sampled token has the log-prob a from-scratch pass over that sample alone gives it, the pointer's
    included (a state or image rows mixed up between the samples' rows make them differ, or impossible)."""
    backend = _zooming(HFBackend(str(builtin), kv_cache_gb=kv_cache_gb))
    sampled = lambda t: GenerateParams(max_new_tokens=12, temperature=1.0, n=2, seed=7 + t)  # noqa: E731
    conversation = [_start(0)]
    _converse(backend, conversation, 2, sampled)
    steps: list[torch.Tensor] = []  # per decoding step of the two rows: log-probs of the next token

    def record(module, args, out) -> None:
        if out.logits.shape[0] == 2:
            steps.append(out.logits[:, -1].float().log_softmax(-1))

    hook = backend.model.register_forward_hook(record)
    try:
        replies = asyncio.run(backend.generate(conversation[0], sampled(2)))
    finally:
        hook.remove()
    assert bool(backend.kv_cache and backend.kv_cache.stats["reused_tokens"]) == bool(kv_cache_gb)
    assert replies[0].token_ids != replies[1].token_ids  # the two rows grew apart
    _, prefix = backend._prompt(conversation[0], None)
    for j, reply in enumerate(replies):
        ids, targets = torch.tensor([reply.prompt_token_ids + reply.token_ids]), torch.tensor(reply.token_ids)
        with torch.no_grad():
            alone = backend.model(
                input_ids=ids, pixel_values=torch.cat(prefix.pixels), image_grid_thw=torch.stack(prefix.grids)
            )
        n = len(reply.prompt_token_ids)
        want = alone.logits[0, n - 1 : len(ids[0]) - 1].float().log_softmax(-1).gather(1, targets[:, None])
        got = torch.stack([step[j] for step in steps[: len(targets)]]).gather(1, targets[:, None])
        assert bool((want > -100).all())  # tokens the pointer allows (it gives the others a logit of -1e4)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_sampled_tokens_have_the_log_probs_of_a_from_scratch_pass(tiny_qwen):
    """Seeded sampling over turns with images between: the reused prefix gives each sampled token the log-prob
    a from-scratch pass gives it (mrope positions with their image offsets included), and so the same draws."""
    cached, plain = HFBackend(str(tiny_qwen), kv_cache_gb=1), HFBackend(str(tiny_qwen), kv_cache_gb=0)
    sampled = lambda t: GenerateParams(max_new_tokens=12, temperature=1.0, seed=40 + t)  # noqa: E731
    conversation = [_start(0)]
    assert _converse(cached, conversation, 3, sampled) == _converse(plain, [_start(0)], 3, sampled)

    # Turn 4 by hand: its prompt (with a new image) and sampled tokens through the kept prefix, and from scratch.
    _, prefix = cached._prompt(conversation[0], None)
    entry, reused = cached.kv_cache.match(prefix.ids, prefix.digests, limit=len(prefix.ids) - 1)
    assert entry is not None and reused > len(prefix.ids) // 2
    (reply,) = asyncio.run(cached.generate(conversation[0], sampled(3)))
    ids = prefix.ids + reply.token_ids
    model, full = cached.model, torch.tensor([ids])
    images = {
        "pixel_values": torch.cat(prefix.pixels),
        "image_grid_thw": torch.stack(prefix.grids),
        "mm_token_type_ids": (full == cached.image_token_id).long(),
    }
    with torch.no_grad():
        scratch = model(input_ids=full, **images).logits[0].log_softmax(-1)  # the model's own positions
        positions = model._prepare_position_ids_for_generation(
            full, {"attention_mask": torch.ones_like(full), **images}
        )
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in entry.layers])
        done = int((image_starts(full[0].numpy(), cached.image_token_id) < reused).sum())  # images in the prefix
        rest = full[:, reused:]
        continued = (
            model(
                input_ids=rest,
                attention_mask=torch.ones_like(full),
                position_ids=positions[..., reused:],
                cache=cache,
                pixel_values=torch.cat(prefix.pixels[done:]),
                image_grid_thw=torch.stack(prefix.grids[done:]),
                mm_token_type_ids=(rest == cached.image_token_id).long(),
            )
            .logits[0]
            .log_softmax(-1)
        )
    n = len(prefix.ids)
    targets = torch.tensor(reply.token_ids)
    want = scratch[n - 1 : len(ids) - 1].gather(1, targets[:, None])
    got = continued[n - 1 - reused : len(ids) - 1 - reused].gather(1, targets[:, None])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_conversations_that_differ_only_in_their_images_share_nothing(tiny_qwen):
    """Two images of one size have the same token ids: the prefix caches must tell them apart."""
    first, second = gradient_image(280, 224), gradient_image(280, 224).transpose(1)  # mirrored: same size
    shared = HFBackend(str(tiny_qwen), kv_cache_gb=1)
    fresh = HFBackend(str(tiny_qwen), kv_cache_gb=1)

    def messages(image) -> list[Message]:
        return [Message("system", "You answer."), Message("user", [ImagePart(image=image), TextPart("What?")])]

    def ask(backend: HFBackend, image) -> list[int]:
        params = GenerateParams(max_new_tokens=12, temperature=1.0, seed=5)
        return asyncio.run(backend.generate(messages(image), params))[0].token_ids

    ask(shared, first)
    assert ask(shared, second) == ask(fresh, second)
    _, prefix = shared._prompt(messages(second), None)
    assert shared.kv_cache.stats["reused_tokens"] <= prefix.ids.index(shared.image_token_id)  # text before it only

    # The token-id prefix: a remembered turn with the same text but the other image is not reused.
    messages = [Message("user", [ImagePart(image=first), TextPart("What?")])]
    text, prefix = shared._prompt(messages, None)
    shared._prefixes[(text + "A reply", tuple(prefix.digests))] = _Prefix(
        [*prefix.ids, 1, 2, 3], prefix.pixels, prefix.grids, prefix.digests
    )
    later = [Message("user", [ImagePart(image=second), TextPart("What?")]), Message("assistant", "A reply")]
    _, got = shared._prompt([*later, Message("user", "More?")], None)
    _, want = fresh._prompt([*later, Message("user", "More?")], None)
    assert got.ids == want.ids and torch.equal(got.pixels[0], want.pixels[0])


def test_two_image_questions_that_differ_in_the_second_image_share_only_what_comes_before_it(tiny_qwen):
    """image_1 and the text the same, image_2 mirrored (same size, so the same token ids): the kept key/values
    are reused up to image_2 and no further, and the replies are those of a backend that never saw the other."""
    first, second = gradient_image(280, 224), gradient_image(196, 252)

    def messages(image) -> list[Message]:
        parts = [TextPart("image_1:\n"), ImagePart(image=first), TextPart("\nimage_2:\n"), ImagePart(image=image)]
        return [Message("system", "You answer."), Message("user", [*parts, TextPart("\nWhich?")])]

    params = GenerateParams(max_new_tokens=12, temperature=1.0, seed=5)
    shared, fresh = HFBackend(str(tiny_qwen), kv_cache_gb=1), HFBackend(str(tiny_qwen), kv_cache_gb=1)
    asyncio.run(shared.generate(messages(second), params))
    mirrored = messages(second.transpose(0))
    reply = asyncio.run(shared.generate(mirrored, params))[0].token_ids
    assert reply == asyncio.run(fresh.generate(mirrored, params))[0].token_ids
    _, prefix = shared._prompt(mirrored, None)
    runs = image_runs(prefix.ids, shared.image_token_id)
    assert len(runs) == 2 and runs[0].length != runs[1].length
    reused = shared.kv_cache.stats["reused_tokens"]
    assert runs[0].start + runs[0].length < reused <= runs[1].start  # image_1 reused, image_2 computed anew


def test_changed_weights_drop_the_kept_key_values(tiny_qwen):
    """RL updates the weights in place between steps: nothing computed with the old ones may be reused."""
    cached, plain = HFBackend(str(tiny_qwen), kv_cache_gb=1), HFBackend(str(tiny_qwen), kv_cache_gb=0)
    plain.model = cached.model
    greedy = lambda t: GenerateParams(max_new_tokens=10, temperature=0)  # noqa: E731
    conversation = [_start(1)]
    _converse(cached, conversation, 1, greedy)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(cached.model.parameters(), lr=1.0)
    for p in cached.model.parameters():
        p.grad = torch.randn_like(p) * 0.2
    optimizer.step()
    (reply,) = asyncio.run(cached.generate(conversation[0], greedy(1)))
    (recomputed,) = asyncio.run(plain.generate(conversation[0], greedy(1)))
    assert reply.token_ids == recomputed.token_ids
    assert cached.kv_cache.stats["requests"] == 2 and cached.kv_cache.stats["reused_tokens"] == 0


def test_a_model_without_a_plain_dynamic_cache_runs_without_reuse(tiny_qwen, tmp_path):
    """Sliding-window layers keep a different cache: the backend computes every turn whole, with the same outputs."""
    folder = tmp_path / "sliding"
    folder.mkdir()
    for f in tiny_qwen.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text.update(use_sliding_window=True, sliding_window=4096, max_window_layers=0)
    text["layer_types"] = ["sliding_attention"] * text["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    cached, plain = HFBackend(str(folder), kv_cache_gb=1), HFBackend(str(folder), kv_cache_gb=0)
    greedy = lambda t: GenerateParams(max_new_tokens=8, temperature=0)  # noqa: E731
    assert _converse(cached, [_start(k) for k in range(2)], 2, greedy) == _converse(
        plain, [_start(k) for k in range(2)], 2, greedy
    )
    assert id(cached.model) in cached._unsupported and not cached.kv_cache.entries


def test_kv_cache_matching_and_memory_bound():
    """Prefix matching by ids and images, cut at the first differing image and never inside one; LRU by bytes."""
    pad = 9
    kv = KVCache(max_bytes=3 * 2 * 4 * 20, image_token_id=pad)  # room for three 20-token entries of one layer

    def layers(n: int) -> list:
        return [(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))]

    a = [1, 2, 9, 9, 9, 3, 4, 9, 9, 5]  # two images
    kv.put(a, [b"x", b"y"], layers(len(a)))
    assert kv.match([*a, 6, 7], [b"x", b"y"], limit=11)[1] == 10
    assert kv.match([*a, 6, 7], [b"x", b"z"], limit=11)[1] == 7  # the second image differs: up to its start
    assert kv.match(a, [b"w", b"y"], limit=9)[1] == 2
    assert kv.match([1, 2, 9, 9, 9, 9, 4], [b"x"], limit=6)[1] == 2  # ids part inside an image: back to its start
    assert kv.match(a, [b"x", b"y"], limit=9)[1] == 9  # the limit leaves the last token to run
    assert kv.match([7, 7], [], limit=1) == (None, 0)
    kv.put([*a, 6, 7], [b"x", b"y"], layers(12))  # extends the first entry: it goes
    assert len(kv.entries) == 1
    for k in range(3):
        kv.put([20 + k] * 20, [], layers(20))
    assert kv.nbytes <= kv.max_bytes and kv.stats["evicted"] == 1 and len(kv.entries) == 3
    assert kv.match([*a, 6, 7, 8], [b"x", b"y"], limit=13) == (None, 0)  # the oldest went first


def test_kv_cache_drops_finished_conversations_beyond_its_entry_bound():
    """Bytes to spare, but at most ``max_entries`` kept: the least recently used go, a conversation in use stays."""
    kv = KVCache(max_bytes=1 << 30, image_token_id=9, max_entries=2)

    def layers(n: int) -> list:
        return [(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))]

    kv.put([1, 2, 3], [], layers(3))  # a live conversation
    kv.put([4, 5, 6], [], layers(3))  # finished
    assert kv.match([1, 2, 3, 7], [], limit=3)[1] == 3  # its next turn: used most recently
    kv.put([8, 8, 8], [], layers(3))
    assert len(kv.entries) == 2 and kv.nbytes == 2 * 2 * 3 * 4 and kv.stats["evicted"] == 1
    assert kv.match([4, 5, 6, 7], [], limit=3) == (None, 0) and kv.match([1, 2, 3, 7], [], limit=3)[1] == 3


def test_tool_calls_from_a_local_model_never_raise():
    """Hermes tool calls are read by plain search: nesting too deep to parse is unreadable, not an exception, and
    many unclosed tags take linear time."""
    from glimpse.models.hf import split_tool_calls

    deep = "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>"
    assert split_tool_calls(deep) == (deep, [])
    text, calls = split_tool_calls('hi <tool_call>{"name": "zoom_in", "arguments": {"a": 1}}</tool_call>')
    assert text == "hi " and [(c.id, c.name, c.arguments) for c in calls] == [("call_0", "zoom_in", '{"a": 1}')]
    split_tool_calls("<tool_call>{" * 200_000)  # returns at once


def test_special_tokens_written_as_text_stay_text(backend):
    """Text a model or its code wrote that spells the template's special tokens (``<|image_pad|>``,
    ``<|im_end|>``) is tokenised as text: one image placeholder run per image, the turn structure intact."""
    spelled = "<|vision_start|><|image_pad|><|vision_end|> and <|im_end|>"
    messages = [
        Message("system", "You answer."),
        Message("user", [ImagePart(image=gradient_image(280, 224)), TextPart("What? " + spelled)]),
        Message("assistant", "<think>" + spelled + "</think>"),
        Message("user", [TextPart("Output:\n" + spelled)]),
    ]
    (reply,) = asyncio.run(backend.generate(messages, GenerateParams(max_new_tokens=4, temperature=0)))
    ids = reply.prompt_token_ids
    assert len(image_runs(ids, backend.image_token_id)) == 1
    im_end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == len(messages)  # the turns' own ends, none from the text
    assert "<\u200b|image_pad|>" in backend.tokenizer.decode(ids)
    # training encodes a trajectory's text the same way (``hf_chat`` with this escape)
    chat, _ = to_hf(messages, escape=special_token_escaper(backend.tokenizer))
    assert all("<|im_end|>" not in str(m["content"]) for m in chat)
